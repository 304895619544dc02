"""Config: precedence, errors naming file and key, the shipped config.toml."""

from __future__ import annotations

from pathlib import Path

import pytest

from image_server.config import env_overrides, load_config
from image_server.errors import ConfigError

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
