"""Config: precedence, errors naming file and key, the shipped config.toml."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest

from image_server.config import build_config, env_overrides, load_config
from image_server.errors import ConfigError
from image_server.generators.fal.config import KNOWN_ENDPOINTS
from image_server.generators.registry import get_generator_class

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_shipped_config_runs_with_no_keys():
    config = load_config(REPO / "config.toml", environ={})
    assert config.default_generator == "mock"
    assert config.generators["mock"].strategy == "mock"
    assert config.sockets.requests.bind == "tcp://127.0.0.1:5555"


def test_precedence_defaults_file_env_flags(tmp_path):
    path = write(tmp_path, 'heartbeat_interval_s = 2.0\noutput_dir = "from-file"\nservice_id = "file"\n')
    assert load_config(None, environ={}).heartbeat_interval_s == 1.0
    config = load_config(
        path,
        environ={"IMAGE_SERVER_OUTPUT_DIR": "from-env", "IMAGE_SERVER_SERVICE_ID": "env"},
        overrides={"service_id": "flag"},
    )
    assert config.heartbeat_interval_s == 2.0  # file beats default
    assert config.output_dir == Path("from-env")  # env beats file
    assert config.service_id == "flag"  # flags beat env


def test_env_nested_keys_and_json_values():
    assert env_overrides(
        {
            "IMAGE_SERVER_LIMITS__MAX_IN_FLIGHT": "7",
            "IMAGE_SERVER_SOCKETS__REQUESTS__BIND": "tcp://127.0.0.1:1",
            "HOME": "/",
        }
    ) == {"limits": {"max_in_flight": 7}, "sockets": {"requests": {"bind": "tcp://127.0.0.1:1"}}}
    config = load_config(
        None,
        environ={"IMAGE_SERVER_GENERATORS__MOCK__STRATEGY": "mock", "IMAGE_SERVER_GENERATORS__MOCK__DELAY_S": "0.5"},
    )
    assert config.generators["mock"].delay_s == 0.5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("heartbeat_interval_s = -1\n", "heartbeat_interval_s"),
        ("[limits]\nmax_in_flight = 0\n", "limits.max_in_flight"),
        ("bogus = 1\n", "bogus"),
        ('[generators.x]\nstrategy = "mock"\ndelay_s = "soon"\n', "[generators.x]: delay_s"),
        ('[generators.x]\nstrategy = "nonexistent"\n', "unknown strategy 'nonexistent'"),
        ("[generators.x]\ndelay_s = 1\n", "needs a 'strategy'"),
        ('default_generator = "gone"\n', "default_generator 'gone' is not configured"),
        ('[sockets.requests]\nkind = "pub"\nbind = "tcp://127.0.0.1:1"\n', "sockets.requests.kind"),
        ("not toml [", "invalid TOML"),
    ],
)
def test_errors_name_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(path) in str(info.value) and expected in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml", environ={})


# -- the commented-out generator examples in config.toml ------------------------------------------


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    """The workflow examples name examples/workflows, relative to where the service starts."""
    monkeypatch.chdir(REPO)


EXAMPLE_BEGIN, EXAMPLE_END = "# >>> example", "# <<< example"
EXAMPLE_NAMES = {
    "falai",
    "falai_flux",
    "falai_lightning_i2i",
    "falai_flux_i2i",
    "falai_lora",
    "openai",
    "openai_wide",
    "gemini",
    "cloudflare",
    "kie",
    "cloudflare_flux",
    "cloudflare_sdxl",
    "cloudflare_img2img",
    "leonardo",
    "runware",
    "invokeai_sdxl",
    "invokeai_flux",
    "comfy",
    "runpod",
    "local_sdxl_turbo",
    "mock_backup",
}
SHIPPED = (REPO / "config.toml").read_text()


def uncomment_examples(text: str, *, only: int | None = None, optional: bool = False) -> str:
    """``text`` with the example blocks (all, or block ``only``) uncommented: "# " is stripped from
    each line; "## " prose stays a comment, and so do "# # " optional knobs unless ``optional``."""
    lines, block = [], -1
    inside = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith(EXAMPLE_BEGIN):
            assert not inside, f"config.toml:{number}: an example starts inside another"
            inside, block = True, block + 1
        elif line.startswith(EXAMPLE_END):
            assert inside, f"config.toml:{number}: an example ends that never started"
            inside = False
        elif inside:
            # A line that is not a comment inside a block would be live config in the shipped file.
            assert line.startswith("#"), f"config.toml:{number}: example line is not commented out: {line!r}"
            if only is None or only == block:
                if optional and line.startswith("# # "):
                    line = line[2:]
                line = line[2:] if line.startswith("# ") else line.removeprefix("#")
        lines.append(line)
    assert not inside, "config.toml: the last example never ends"
    return "\n".join(lines)


def example_count() -> int:
    return sum(line.startswith(EXAMPLE_BEGIN) for line in SHIPPED.splitlines())


def test_examples_stay_comments_in_the_shipped_config():
    # fal, openai, gemini, cloudflare, kie with cloudflare_flux, leonardo, runware, invokeai, comfyui, runpod,
    # diffusers, spending; [cluster]
    assert example_count() == 13
    shipped = load_config(REPO / "config.toml", environ={})
    assert not EXAMPLE_NAMES & set(shipped.generators)


@pytest.mark.parametrize("optional", [False, True], ids=["as-shipped", "with-optional-knobs"])
def test_all_examples_uncommented_validate(optional):
    data = tomllib.loads(uncomment_examples(SHIPPED, optional=optional))
    config = build_config(data, source="config.toml with its examples uncommented")
    generators = config.generators
    assert set(generators) == EXAMPLE_NAMES | {"mock"}
    by_strategy: dict[str, set[str]] = {}
    for name, table in generators.items():
        by_strategy.setdefault(table.strategy, set()).add(name)
        assert set(table.fallbacks) <= set(generators), f"{name} falls back to an unconfigured generator"
        # No secrets in the file: every *_env field names a variable, never holds a key.
        for field, value in table.model_dump().items():
            if field.endswith("_env") and value is not None:
                assert re.fullmatch(r"[A-Z][A-Z0-9_]*", value), f"{name}.{field} = {value!r}"
    assert set(by_strategy) == {
        "mock",
        "fal",
        "openai",
        "gemini",
        "cloudflare",
        "kie",
        "leonardo",
        "runware",
        "invokeai",
        "comfyui",
        "runpod",
        "diffusers",
    }
    assert {generators[n].endpoint for n in by_strategy["fal"]} == set(KNOWN_ENDPOINTS)
    assert {generators[n].model for n in by_strategy["openai"]} == {"gpt-image-2"}
    assert not any(table.startup_warnings() for table in generators.values())  # no retired models
    # Each builds a generator (no key needed before open()) whose capabilities fit its name.
    built = {
        name: get_generator_class(table.strategy)(table, name=name, environ={}) for name, table in generators.items()
    }
    i2i = {name for name, generator in built.items() if generator.capabilities.image_to_image}
    assert i2i == {
        "mock",
        "mock_backup",
        "falai_lightning_i2i",
        "falai_flux_i2i",
        "openai",
        "openai_wide",
        "gemini",
        "kie",
        "cloudflare_img2img",
        "leonardo",
        "runware",
        "invokeai_sdxl",
        "invokeai_flux",
        "local_sdxl_turbo",
    }


@pytest.mark.parametrize("block", range(example_count()))
def test_each_example_validates_on_its_own(block):
    data = tomllib.loads(uncomment_examples(SHIPPED, only=block))
    config = build_config(data)
    added = set(config.generators) - {"mock"}
    assert added <= EXAMPLE_NAMES
    assert added or config.cluster.enabled  # every block configures something


def test_a_broken_example_is_caught(tmp_path):
    """The check is not vacuous: a typo in an example fails validation."""
    broken = SHIPPED.replace('# quality = "high"', '# quality = "ultra"', 1)
    assert broken != SHIPPED
    with pytest.raises(ConfigError, match="quality"):
        build_config(tomllib.loads(uncomment_examples(broken)))


def test_a_strategy_refuses_another_strategys_table():
    """The base constructor checks the table's model, so a mix-up fails loudly, not with defaults."""
    tables = build_config(tomllib.loads(uncomment_examples(SHIPPED))).generators
    one_each = {table.strategy: table for table in tables.values()}
    for strategy, table in one_each.items():
        cls = get_generator_class(strategy)
        assert cls(table).environ is os.environ  # keys come from the process environment by default
        for other in one_each.values():
            if other.strategy != strategy:
                with pytest.raises(TypeError, match=f"{cls.__name__} needs a {type(table).__name__}"):
                    cls(other)


def test_the_kie_example_is_the_seed_projects_pair():
    """Kie first, Cloudflare flux when Kie gives up; the block stands on its own."""
    openings = [line for line in SHIPPED.splitlines() if line.startswith(EXAMPLE_BEGIN)]
    block = next(number for number, line in enumerate(openings) if "Kie.ai" in line)
    generators = build_config(tomllib.loads(uncomment_examples(SHIPPED, only=block))).generators
    assert set(generators) == {"mock", "kie", "cloudflare_flux"}
    assert generators["kie"].strategy == "kie" and generators["kie"].fallbacks == ["cloudflare_flux"]
    flux = generators["cloudflare_flux"]
    assert flux.strategy == "cloudflare" and flux.model == "@cf/black-forest-labs/flux-1-schnell"


def test_sockets_given_only_through_the_environment(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('default_generator = "mock"\n[generators.mock]\nstrategy = "mock"\n')  # no [sockets.*]
    environ = {
        "IMAGE_SERVER_SOCKETS__REQUESTS__BIND": "tcp://127.0.0.1:7001",
        "IMAGE_SERVER_SOCKETS__EVENTS__BIND": "tcp://127.0.0.1:7002",
    }
    config = load_config(path, environ=environ)
    assert (config.sockets.requests.kind, config.sockets.requests.bind) == ("sub", "tcp://127.0.0.1:7001")
    assert (config.sockets.events.kind, config.sockets.events.bind) == ("xpub", "tcp://127.0.0.1:7002")
    connecting = load_config(path, environ={"IMAGE_SERVER_SOCKETS__EVENTS__CONNECT": '["tcp://broker:6000"]'})
    assert connecting.sockets.events.kind == "xpub" and connecting.sockets.events.bind is None
