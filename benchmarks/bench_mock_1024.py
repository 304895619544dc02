"""Figure 2: the mock at 1024x1024 with file delivery, one at a time and in a burst of 200.

The generator is configured as in the shipped config.toml (style ``detailed``, concurrency
8, PNG level 1), so each image costs a real draw plus a PNG encode and an atomic file
write. Sequential: requests one after another; burst: all 200 sent at once. Throughput is
images per second of wall time at the client.

    uv run python benchmarks/bench_mock_1024.py [--runs 3] [--sequential 20] [--burst 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from harness import burst, machine, median_of, running_service

from image_server.client import RenderClient
from schemas import RenderRequest

GENERATORS = {"mock": {"strategy": "mock", "style": "detailed", "concurrency": 8}}


def _requests(prefix: str, count: int) -> list[RenderRequest]:
    return [
        RenderRequest(request_id=f"{prefix}-{i}", prompt=f"a lighthouse at dusk #{i}", width=1024, height=1024)
        for i in range(count)
    ]


async def _drive(requests_endpoint: str, events_endpoint: str, sequential: int, size: int) -> dict[str, Any]:
    async with RenderClient(requests_endpoint, events_endpoint) as client:
        await client.wait_ready()
        await burst(client, _requests("warm", 2), concurrency=1)
        one_by_one = await burst(client, _requests("seq", sequential), concurrency=1)
        at_once = await burst(client, _requests("burst", size), timeout=300)
    return {"sequential": one_by_one.figures(), "burst": at_once.figures()}


def measure(sequential: int, size: int) -> dict[str, Any]:
    with running_service(GENERATORS, log_level="warning") as service:
        result = asyncio.run(_drive(service.requests, service.events, sequential, size))
    return {**result, "machine": machine()}


def run(runs: int = 3, sequential: int = 20, size: int = 200) -> dict[str, Any]:
    samples = [measure(sequential, size) for _ in range(runs)]
    summary = {
        f"{mode}_{key}": median_of(samples, f"{mode}.{path}")
        for mode in ("sequential", "burst")
        for key, path in (("images_per_s", "images_per_s"), ("p50_ms", "latency.p50_ms"), ("p99_ms", "latency.p99_ms"))
    }
    summary["burst_resends"] = median_of(samples, "burst.resends")
    return {
        "figure": "mock 1024x1024, file delivery",
        "config": GENERATORS["mock"],
        "sequential_requests": sequential,
        "burst_requests": size,
        "median": summary,
        "failures": sum(s[m]["failures"] for s in samples for m in ("sequential", "burst")),
        "runs": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sequential", type=int, default=20)
    parser.add_argument("--burst", type=int, default=200)
    args = parser.parse_args()
    print(json.dumps(run(args.runs, args.sequential, args.burst), indent=2))


if __name__ == "__main__":
    main()
