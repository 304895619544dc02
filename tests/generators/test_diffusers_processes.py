"""Without the ``local`` extra, and without a diffusers generator: subprocesses, so that what a
process imported (torch or not) and how much memory it holds can be seen from outside."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio

from image_server.client import RenderClient
from tests.procs import Procs, write_config

# Installed as sitecustomize in a child's PYTHONPATH: the extra's packages cannot be imported there.
HIDE_EXTRA = """
import importlib.abc, sys

class HideLocalExtra(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"torch", "diffusers", "transformers", "safetensors"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, HideLocalExtra())
"""
LOOPBACK = {
    "requests": {"kind": "sub", "bind": "tcp://127.0.0.1:0"},
    "events": {"kind": "xpub", "bind": "tcp://127.0.0.1:0"},
}


@pytest.fixture
def without_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Children started from now on run with the extra hidden (Proc copies os.environ)."""
    folder = tmp_path / "hide-extra"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(HIDE_EXTRA)
    monkeypatch.setenv("PYTHONPATH", str(folder))


def service_config(tmp_path: Path, extra_table: str = "") -> Path:
    path = write_config(
        tmp_path / "config.toml",
        service_id="no-extra",
        state_dir=tmp_path / "state",
        output_dir=tmp_path / "output",
        heartbeat_interval_s=0.2,
        sockets=LOOPBACK,
        mock={},
    )
    path.write_text(path.read_text() + extra_table)
    return path


async def test_the_blocker_really_hides_torch(without_extra: None) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import torch", stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL
    )
    _, stderr = await proc.communicate()
    assert proc.returncode == 1 and b"No module named 'torch'" in stderr


async def test_a_diffusers_generator_without_the_extra_is_a_one_line_error(
    procs: Procs, tmp_path: Path, without_extra: None
) -> None:
    table = f'\n[generators.local]\nstrategy = "diffusers"\nmodel = "{tmp_path}"\n'
    code, output = await procs.run("--config", str(service_config(tmp_path, table)), "generators")
    assert code == 3  # README.md, "Start-up checks and exit codes"
    (line,) = output.strip().splitlines()
    assert line.startswith("image-server: ") and "[generators.local]" in line
    assert "uv sync --extra local" in line and "torch" in line


async def test_the_service_serves_without_the_extra_and_never_loads_torch(
    procs: Procs, tmp_path: Path, without_extra: None, context: zmq.asyncio.Context
) -> None:
    service = await procs.service("service", service_config(tmp_path))
    assert service.process is not None
    async with RenderClient(service.endpoints["requests"], service.endpoints["events"], context=context) as client:
        result = await client.render(request_id="r1", prompt="no torch here", width=64, height=64, timeout=20)
    assert result.event.images[0].width == 64


async def test_idle_memory_without_a_diffusers_generator_stays_flat(
    procs: Procs, tmp_path: Path, context: zmq.asyncio.Context
) -> None:
    """With the extra installed but no diffusers generator configured, torch is never mapped into
    the process and its resident memory does not grow while it serves and idles."""
    service = await procs.service("service", service_config(tmp_path))
    assert service.process is not None
    pid = service.process.pid

    def resident_kib() -> int:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])

    async with RenderClient(service.endpoints["requests"], service.endpoints["events"], context=context) as client:
        for n in range(5):  # warm up: first renders allocate Pillow's and the journal's buffers
            await client.render(request_id=f"warm{n}", prompt="warm", width=64, height=64, timeout=20)
        before = resident_kib()
        for n in range(30):
            await client.render(request_id=f"r{n}", prompt="steady", width=64, height=64, timeout=20)
        for _ in range(5):  # idle through a few heartbeats
            await client.status(timeout=10)
            await asyncio.sleep(0.2)
        after = resident_kib()
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "libtorch" not in maps and "/torch/" not in maps
    assert after - before < 8 * 1024, f"resident memory grew from {before} KiB to {after} KiB"
    assert after < 150 * 1024, f"{after} KiB resident: something heavy was imported"


async def test_generators_check_names_a_model_that_is_not_cached(
    procs: Procs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    table = '\n[generators.local]\nstrategy = "diffusers"\nmodel = "nobody/no-such-model"\n'
    code, output = await procs.run("--config", str(service_config(tmp_path, table)), "generators", "--check")
    assert code == 1
    assert (
        "local: generator 'local': model nobody/no-such-model is neither a folder nor in the Hugging Face cache"
        in output
    )


async def test_generators_check_loads_nothing_and_reports_the_family(procs: Procs, tmp_path: Path, tiny: Any) -> None:
    table = f'\n[generators.local]\nstrategy = "diffusers"\nmodel = "{tiny.sdxl}"\n'
    code, output = await procs.run("--config", str(service_config(tmp_path, table)), "generators", "--check")
    assert code == 0, output
    assert f"sdxl pipeline in {tiny.sdxl} (loads on first use)" in " ".join(output.split())


async def test_a_preloaded_model_that_does_not_load_stops_the_start(procs: Procs, tmp_path: Path, tiny: Any) -> None:
    table = f'\n[generators.local]\nstrategy = "diffusers"\nmodel = "{tiny.corrupt}"\ndevice = "cpu"\npreload = true\n'
    code, output = await procs.run("--config", str(service_config(tmp_path, table)), "serve", timeout=120)
    assert code == 3
    errors = [line for line in output.splitlines() if line.startswith("image-server: ")]
    assert len(errors) == 1 and f"cannot load the pipeline in {tiny.corrupt}" in errors[0]
