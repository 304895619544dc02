"""Strategy name -> generator class, with lazy imports (after fsspec's registry).

Built-ins are dotted paths imported on first use, so a provider SDK is never imported
unless a generator using it is configured. Third-party strategies register through the
``image_server.generators`` entry-point group, loaded only when asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Any

from image_server.errors import ConfigError, GeneratorUnavailable
from image_server.generators.base import Generator, GeneratorConfig

ENTRY_POINT_GROUP = "image_server.generators"

_BUILTINS: dict[str, str] = {
    "mock": "image_server.generators.mock:MockGenerator",
    "fal": "image_server.generators.fal:FalGenerator",
    "openai": "image_server.generators.openai:OpenAIGenerator",
    "gemini": "image_server.generators.gemini:GeminiGenerator",
    "cloudflare": "image_server.generators.cloudflare:CloudflareGenerator",
    "kie": "image_server.generators.kie:KieGenerator",
    "leonardo": "image_server.generators.leonardo:LeonardoGenerator",
    "runware": "image_server.generators.runware:RunwareGenerator",
    "invokeai": "image_server.generators.invokeai:InvokeAIGenerator",
    "comfyui": "image_server.generators.comfyui:ComfyUIGenerator",
    "runpod": "image_server.generators.runpod:RunPodGenerator",
    "diffusers": "image_server.generators.diffusers:DiffusersGenerator",
}

# The optional extra a strategy's dependencies come in, where its name differs from the strategy's.
_EXTRAS: dict[str, str] = {"diffusers": "local"}

_registry: dict[str, str | type[Generator]] = dict(_BUILTINS)
strategies: Mapping[str, str | type[Generator]] = MappingProxyType(_registry)
_entry_points_loaded = False


def register_generator(strategy: str, cls: str | type[Generator], *, clobber: bool = False) -> None:
    """Register a class (or ``"module:Class"`` path) under ``strategy``."""
    if strategy in _registry and not clobber and _registry[strategy] != cls:
        raise ValueError(f"strategy {strategy!r} is already registered ({_registry[strategy]!r}); pass clobber=True")
    _registry[strategy] = cls


def reset_registry() -> None:
    """Back to the built-ins only (for tests)."""
    global _entry_points_loaded
    _registry.clear()
    _registry.update(_BUILTINS)
    _entry_points_loaded = False


def load_entry_points() -> None:
    """Register strategies published by installed packages (idempotent)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        _registry.setdefault(entry.name, entry.value.replace(" ", ""))
    _entry_points_loaded = True


def get_generator_class(strategy: str) -> type[Generator]:
    """Import (once) and return the class for ``strategy``."""
    if strategy not in _registry:
        load_entry_points()
    try:
        target = _registry[strategy]
    except KeyError:
        known = ", ".join(sorted(_registry))
        raise GeneratorUnavailable(f"unknown strategy {strategy!r}; known strategies: {known}") from None
    if isinstance(target, str):
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise GeneratorUnavailable(
                f"strategy {strategy!r} could not be imported ({exc}); is its extra installed? "
                f"try: uv sync --extra {_EXTRAS.get(strategy, strategy)}"
            ) from exc
        cls = getattr(module, attr)
        if not (isinstance(cls, type) and issubclass(cls, Generator)):
            raise GeneratorUnavailable(f"{target} is not a Generator subclass")
        _registry[strategy] = cls
        return cls
    return target


def validate_generator_config(name: str, table: Mapping[str, Any]) -> GeneratorConfig:
    """Validate one ``[generators.<name>]`` table with its strategy's config model."""
    strategy = table.get("strategy")
    if not isinstance(strategy, str):
        raise ConfigError(f"[generators.{name}] needs a 'strategy' string")
    try:
        cls = get_generator_class(strategy)
    except GeneratorUnavailable as exc:
        raise ConfigError(f"[generators.{name}]: {exc}") from exc
    from pydantic import ValidationError

    try:
        return cls.config_model.model_validate(dict(table))
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        raise ConfigError(f"[generators.{name}]: {details}") from exc


def create_generator(name: str, config: GeneratorConfig) -> Generator:
    """Instantiate the strategy named by ``config.strategy`` as generator ``name``."""
    return get_generator_class(config.strategy)(config, name=name)
