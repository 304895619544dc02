"""The workflow strategies from the command line: ``generators --check`` and start-up errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.runpod import FakeRunPod
from tests.test_cli import REPO, table_rows, write_config

WORKFLOWS = (REPO / "examples" / "workflows").as_posix()


def comfy_table(url: str, prompt_target: str = "6.inputs.text") -> str:
    return f"""
[generators.comfy]
strategy = "comfyui"
base_url = "{url}"
workflows_dir = "{WORKFLOWS}"
[generators.comfy.workflows.sd15]
file = "sd15_text_to_image.json"
inputs = {{ prompt = "{prompt_target}" }}
"""


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it, in a subprocess (a wide terminal, so table cells are whole)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IMAGE_SERVER_")} | {"COLUMNS": "250"}
    command = [sys.executable, "-m", "image_server", *args]
    return subprocess.run(command, env=environ | (env or {}), capture_output=True, text=True, timeout=60)


def test_generators_check_shows_comfyui_system_stats_and_runpod_health(tmp_path: Path) -> None:
    with FakeComfyUI() as comfy, FakeRunPod(api_key="rp-cli-key-0123456789") as runpod:
        runpod_table = f"""
[generators.rp]
strategy = "runpod"
endpoint_id = "{runpod.endpoint_id}"
base_url = "{runpod.url}"
workflows_dir = "{WORKFLOWS}"
[generators.rp.workflows.sd15]
file = "sd15_text_to_image.json"
inputs = {{ prompt = "6.inputs.text" }}
"""
        config = write_config(tmp_path, comfy_table(comfy.url) + runpod_table)
        done = run("--config", str(config), "generators", "--check", env={"RUNPOD_API_KEY": runpod.api_key})
    assert done.returncode == 0, done.stdout + done.stderr
    rows = table_rows(done.stdout)
    assert rows["comfy"][1] == "comfyui" and rows["comfy"][-1].startswith("ok comfy: ComfyUI 0.8.0 on cuda:0")
    assert rows["rp"][-1].startswith("ok rp: endpoint abc123xyz is up")
    assert "rp-cli-key-0123456789" not in done.stdout + done.stderr


def test_a_mapping_to_a_missing_input_stops_start_up_naming_file_node_and_input(tmp_path: Path) -> None:
    config = write_config(tmp_path, comfy_table("http://127.0.0.1:9", prompt_target="6.inputs.txt"))
    done = run("--config", str(config), "generators")
    assert done.returncode != 0
    message = " ".join(done.stderr.split())
    assert (
        "sd15_text_to_image.json: inputs.prompt = '6.inputs.txt' names input 'txt' of node 6 (CLIPTextEncode)"
        in message
    )
