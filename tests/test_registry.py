"""Strategy registry: lazy built-ins, registration, entry points, clear errors."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest

from image_server.errors import ConfigError, GeneratorUnavailable
from image_server.generators import registry as registry_module
from image_server.generators.base import Generator, GeneratorConfig
from image_server.generators.mock import MockGenerator
from image_server.generators.registry import (
    get_generator_class,
    register_generator,
    reset_registry,
    strategies,
    validate_generator_config,
)


class Custom(Generator):
    strategy = "custom"


@pytest.fixture(autouse=True)
def clean_registry():
    reset_registry()
    yield
    reset_registry()


def test_builtins_are_dotted_paths_until_used():
    assert isinstance(strategies["openai"], str)
    assert get_generator_class("mock") is MockGenerator
    assert strategies["mock"] is MockGenerator


def test_importing_the_service_imports_no_provider_sdk():
    code = (
        "import sys, image_server.service, image_server.cli;"
        "from image_server.config import load_config; load_config(None, environ={});"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fal_client', 'torch', 'diffusers', 'openai')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_register_and_refuse_duplicates():
    register_generator("custom", Custom)
    assert get_generator_class("custom") is Custom
    register_generator("custom", Custom)  # same target again is fine
    with pytest.raises(ValueError, match="already registered"):
        register_generator("custom", MockGenerator)
    register_generator("custom", MockGenerator, clobber=True)
    assert get_generator_class("custom") is MockGenerator
    with pytest.raises(TypeError):
        strategies["x"] = Custom  # type: ignore[index]


def test_unknown_and_broken_strategies_explain_themselves():
    with pytest.raises(
        GeneratorUnavailable, match="unknown strategy 'nope'; known strategies: cloudflare, comfyui, diffusers, fal"
    ):
        get_generator_class("nope")
    register_generator("broken", "image_server.not_a_module:Thing")
    with pytest.raises(GeneratorUnavailable, match="could not be imported"):
        get_generator_class("broken")
    register_generator("notgen", "image_server.errors:ConfigError")
    with pytest.raises(GeneratorUnavailable, match="not a Generator subclass"):
        get_generator_class("notgen")
    with pytest.raises(ConfigError, match=r"\[generators.x\]: unknown strategy"):
        validate_generator_config("x", {"strategy": "nope"})


def test_entry_points_are_loaded_only_when_needed(monkeypatch):
    loaded = []

    def fake_entry_points(*, group: str):
        loaded.append(group)
        return [EntryPoint("thirdparty", "tests.test_registry:Custom", group)]

    monkeypatch.setattr(registry_module, "entry_points", fake_entry_points)
    assert get_generator_class("mock") is MockGenerator
    assert loaded == []  # a built-in needs no entry-point scan
    assert get_generator_class("thirdparty") is Custom
    assert loaded == ["image_server.generators"]
    config = validate_generator_config("mine", {"strategy": "thirdparty"})
    assert isinstance(config, GeneratorConfig)
