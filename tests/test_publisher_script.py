"""scripts/test_publisher.py against a live service: progress, percentiles, exit codes."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "test_publisher.py"


async def run_publisher(service, *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "--requests",
        service.endpoints["requests"],
        "--events",
        service.endpoints["events"],
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    async with asyncio.timeout(60):
        output, _ = await process.communicate()
    return process.returncode or 0, output.decode()


async def test_publisher_renders_and_reports_percentiles(service_factory, tmp_path):
    reference = tmp_path / "ref.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 10, 10)).save(reference)
    async with service_factory() as service:
        code, output = await run_publisher(
            service,
            "a test",
            "--count",
            "6",
            "--concurrency",
            "3",
            "--width",
            "64",
            "--height",
            "64",
            "--reference",
            str(reference),
        )
    assert code == 0, output
    assert "6 ok: p50" in output and "p99" in output
    assert service.counters["completed"] == 6


async def test_publisher_exits_non_zero_on_any_error(service_factory):
    async with service_factory() as service:
        code, output = await run_publisher(service, "a test", "--generator", "missing", "--count", "2")
    assert code == 1
    assert output.count("unknown_generator") == 2


async def test_timeout_bounds_the_wait_for_a_service_and_ends_without_a_traceback(tmp_path):
    import socket
    import time

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "p",
        "--requests",
        f"tcp://127.0.0.1:{port}",
        "--events",
        f"tcp://127.0.0.1:{port}",
        "--timeout",
        "1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    started = time.monotonic()
    async with asyncio.timeout(60):
        output, _ = await process.communicate()
    waited = time.monotonic() - started
    text = output.decode()
    assert process.returncode == 2, text
    assert "no service" in text and "Traceback" not in text, text
    assert waited < 25, waited  # 1 s of waiting plus start-up, not the 30 s it used to be
