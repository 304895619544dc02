"""Start-up checks through the real CLI: one line, a distinct exit code, no traceback.

Exit codes (README.md): 2 config, 3 generator extra missing, 4 address in use, 5 directory
not writable, 6 CURVE keys, 7 state dir held by another service.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.procs import Procs, write_config

pytestmark = pytest.mark.slow

LOOPBACK = {
    "requests": {"kind": "sub", "bind": "tcp://127.0.0.1:0"},
    "events": {"kind": "xpub", "bind": "tcp://127.0.0.1:0"},
}


def config(tmp_path: Path, name: str = "config.toml", **top: object) -> Path:
    values: dict[str, object] = {"state_dir": tmp_path / "state", "output_dir": tmp_path / "output", **top}
    sockets = values.pop("sockets", LOOPBACK)
    assert isinstance(sockets, dict)
    return write_config(tmp_path / name, sockets=sockets, mock={}, **values)


def one_line_refusal(output: str) -> str:
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("image-server: ")]
    assert len(lines) == 1, output
    return lines[0]


async def test_a_second_service_on_the_same_state_dir_refuses_naming_the_holder(procs: Procs, tmp_path: Path) -> None:
    first = await procs.service("first", config(tmp_path))
    assert first.process is not None
    second = await procs.service("second", config(tmp_path, "second.toml"), wait=False)
    assert await second.wait() == 7
    line = one_line_refusal("\n".join(second.lines))
    assert f"in use by another service (pid {first.process.pid})" in line
    assert not second.matching("serving: ")

    # A lock left by a killed holder is free at once: the next service takes it over.
    await first.kill()
    third = await procs.service("third", config(tmp_path, "third.toml"))
    assert third.matching(rf"took over the state dir lock left by pid {first.process.pid}")
    assert (tmp_path / "state" / "service.lock").read_text().strip() == str(third.process.pid)  # type: ignore[union-attr]


async def test_a_port_in_use_is_named(procs: Procs, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sockets = {**LOOPBACK, "requests": {"kind": "sub", "bind": f"tcp://127.0.0.1:{port}"}}
        code, output = await procs.run("--config", str(config(tmp_path, sockets=sockets)), "serve")
        assert code == 4, output
        assert f"tcp://127.0.0.1:{port}" in one_line_refusal(output)

        http = {"enabled": True, "port": port}
        code, output = await procs.run("serve", "--config", str(config(tmp_path, "http.toml", http=http)))
        assert code == 4, output
        assert "cannot bind the HTTP listener" in one_line_refusal(output)


async def test_an_output_dir_that_cannot_be_created_is_refused(procs: Procs, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # root ignores permissions; a file in the path stops anyone
    code, output = await procs.run("serve", "--config", str(config(tmp_path, output_dir=blocker / "output")))
    assert code == 5, output
    assert one_line_refusal(output) == f"image-server: output_dir: {blocker / 'output'} not writable: Not a directory"


async def test_missing_curve_keys_are_refused(procs: Procs, tmp_path: Path) -> None:
    path = config(tmp_path)
    path.write_text(
        path.read_text() + f'[security]\ncurve = true\nsecret_key = "{tmp_path / "keys" / "x.key_secret"}"\n'
    )
    code, output = await procs.run("serve", "--config", str(path))
    assert code == 6, output
    assert "cannot load CURVE key file" in one_line_refusal(output)


async def test_a_generator_whose_dependencies_are_missing_names_the_extra(procs: Procs, tmp_path: Path) -> None:
    # A third-party strategy, installed (its entry point is visible) but without the package
    # it imports, as when its extra was not installed.
    plugins = tmp_path / "plugins"
    info = plugins / "fancy_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fancy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[image_server.generators]\nfancy = fancy_generator:FancyGenerator\n")
    (plugins / "fancy_generator.py").write_text("import fancy_sdk_not_installed  # noqa\n")
    path = config(tmp_path)
    path.write_text(path.read_text() + '[generators.fancy]\nstrategy = "fancy"\n')
    code, output = await procs.run("serve", "--config", str(path), env={"PYTHONPATH": str(plugins)})
    assert code == 3, output
    line = one_line_refusal(output)
    assert "No module named 'fancy_sdk_not_installed'" in line and "uv sync --extra fancy" in line


async def test_an_environment_error_names_the_variable(procs: Procs, tmp_path: Path) -> None:
    env = {"IMAGE_SERVER_HEARTBEAT_INTERVAL_S": "-1"}
    code, output = await procs.run("serve", "--config", str(config(tmp_path)), env=env)
    assert code == 2, output
    line = one_line_refusal(output)
    assert "IMAGE_SERVER_HEARTBEAT_INTERVAL_S" in line and "config.toml" not in line


async def test_a_retired_model_is_a_warning_not_a_refusal(procs: Procs, tmp_path: Path) -> None:
    path = config(tmp_path)
    path.write_text(path.read_text() + '[generators.old]\nstrategy = "openai"\nmodel = "dall-e-3"\n')
    service = await procs.service("retired", path)
    assert service.matching(r"WARNING .*generator old: OpenAI shut dall-e-3 down on 2026-05-12")


async def test_version_and_options_after_the_subcommand(procs: Procs, tmp_path: Path) -> None:
    code, output = await procs.run("--version")
    assert code == 0 and output.startswith("image-server 0."), output
    code, output = await procs.run("config", "check", "--config", str(config(tmp_path)))
    assert code == 0, output
    assert '"service_id": "image-server"' in output
    assert "mock (mock) [default]: text-to-image, image-to-image" in output


async def test_config_check_masks_secrets_and_says_which_key_variables_are_set(procs: Procs, tmp_path: Path) -> None:
    path = config(tmp_path)
    path.write_text(path.read_text() + '[generators.cf]\nstrategy = "cloudflare"\n')
    code, output = await procs.run("config", "check", "--config", str(path), env={"CLOUDFLARE_API_TOKEN": "s3cret"})
    assert code == 0, output
    assert "s3cret" not in output
    assert '"api_token_env": "CLOUDFLARE_API_TOKEN (set)"' in output
    assert '"account_id_env": "CLOUDFLARE_ACCOUNT_ID (not set)"' in output


def test_secret_looking_values_are_masked_wherever_they_sit() -> None:
    from image_server.configcheck import masked

    shown = masked({"arguments": {"api_key": "k1", "nested": [{"token": "t1"}]}, "api_key_env": "NOPE_UNSET_VAR"})
    assert shown == {
        "arguments": {"api_key": "***", "nested": [{"token": "***"}]},
        "api_key_env": "NOPE_UNSET_VAR (not set)",
    }


def test_exit_codes_are_distinct() -> None:
    from image_server import startup

    codes = [value for name, value in vars(startup).items() if name.startswith("EXIT_")]
    assert len(codes) == len(set(codes)) == 8
    assert os.EX_OK == startup.EXIT_OK


async def test_key_files_readable_by_others_or_a_missing_key_folder_are_refused(procs: Procs, tmp_path: Path) -> None:
    code, output = await procs.run("keys", "generate", "--dir", str(tmp_path / "keys"), "--name", "server")
    assert code == 0, output
    secret = tmp_path / "keys" / "server.key_secret"
    path = config(tmp_path)
    security = f'[security]\ncurve = true\nsecret_key = "{secret}"\nauthorized_keys = "{tmp_path / "authorized"}"\n'
    path.write_text(path.read_text() + security)
    code, output = await procs.run("serve", "--config", str(path))
    assert code == 6, output
    assert "authorized_keys" in one_line_refusal(output) and "is not a directory" in output

    (tmp_path / "authorized").mkdir()
    secret.chmod(0o644)
    code, output = await procs.run("serve", "--config", str(path))
    assert code == 6, output
    assert "readable by others (mode 644); chmod 600 it" in one_line_refusal(output)


def test_every_option_has_help_text() -> None:
    import argparse

    from image_server.cli import build_parser

    missing = []
    parsers = [("image-server", build_parser())]
    while parsers:
        name, parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += [(f"{name} {sub}", child) for sub, child in action.choices.items()]
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing
