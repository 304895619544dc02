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
