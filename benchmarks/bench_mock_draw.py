"""Issue 14: the mock's own work per image, in this process (no service, no sockets).

Style ``simple``, 1024x1024 (and 64x64), JPEG at the store's quality: ``draw`` alone, and
draw + encode through ``MockGenerator.generate`` one at a time and 200 at once, drawing in
threads (``processes = 0``) and in drawing processes (``processes = 2``). The figures say
what the GIL allows: threads cannot run two draw + encodes side by side, processes can.

    uv run python benchmarks/bench_mock_draw.py [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from harness import machine, median_of

from image_server.generators.base import RenderJob
from image_server.generators.mock import MockConfig, MockGenerator
from image_server.generators.mock.drawing import draw
from schemas import RenderRequest

COUNT = 200


def _job(index: int, side: int) -> RenderJob:
    request = RenderRequest(
        request_id=f"d-{index}", prompt=f"a lighthouse at dusk #{index}", width=side, height=side, output_format="jpeg"
    )
    return RenderJob(request, references=[], attempt=1)


def _draw_ms(side: int, count: int) -> float:
    started = time.perf_counter()
    for index in range(count):
        draw("simple", width=side, height=side, seed=index, prompt=f"a lighthouse at dusk #{index}")
    return round((time.perf_counter() - started) / count * 1000, 3)


async def _generator(processes: int, count: int) -> dict[str, float]:
    config = MockConfig(strategy="mock", style="simple", processes=processes)
    async with MockGenerator(config, name="mock") as mock:
        await asyncio.gather(*(mock.generate(_job(index, 1024)) for index in range(8)))  # warm: processes up
        started = time.perf_counter()
        for index in range(count):
            await mock.generate(_job(index, 1024))
        sequential = count / (time.perf_counter() - started)
        started = time.perf_counter()
        await asyncio.gather(*(mock.generate(_job(index, 1024)) for index in range(count)))
        at_once = count / (time.perf_counter() - started)
    return {"sequential_images_per_s": round(sequential, 1), "burst_images_per_s": round(at_once, 1)}


def measure(count: int) -> dict[str, Any]:
    return {
        "draw_1024_ms": _draw_ms(1024, count),
        "draw_64_ms": _draw_ms(64, count),
        "threads": asyncio.run(_generator(0, count)),
        "processes": asyncio.run(_generator(2, count)),
        "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=COUNT)
    args = parser.parse_args()
    runs = [measure(args.count) for _ in range(args.runs)]
    keys = [
        "draw_1024_ms",
        "draw_64_ms",
        "threads.sequential_images_per_s",
        "threads.burst_images_per_s",
        "processes.sequential_images_per_s",
        "processes.burst_images_per_s",
        "machine.loadavg_1m",
    ]
    print(json.dumps({"median": {key: median_of(runs, key) for key in keys}, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
