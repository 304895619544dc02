"""InvokeAI strategy: the service's cost around a render, and what queue polling adds.

A fake InvokeAI (tests/fakes/invokeai.py) runs in this process; the service runs as its own
process with one ``invokeai`` generator (SDXL model, 512x512, default polling: 0.25 s backing
off by 1.5x to 1.0 s). Each item "renders" for ``render_s`` after enqueue and completes at the
first poll after that. Sequential requests, after one warm-up request (model list, board).

- ``render_s = 0``: the item is done at the first poll, so the round trip is the service's own
  cost plus its HTTP calls to InvokeAI (enqueue, one poll, the image download).
- ``render_s = 0.5``: round trip minus 0.5 s is overhead plus the wait for the next poll;
  ``notice`` is how long after the fake finished the poll that saw it came (bounded by the
  poll period in force then).

    uv run python benchmarks/bench_invokeai.py [--runs 3] [--requests 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from harness import machine, median_of, running_service, summary_ms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, for tests.fakes

from image_server.client import RenderClient  # noqa: E402
from schemas import RenderRequest  # noqa: E402
from tests.fakes.invokeai import FakeInvokeAI  # noqa: E402

POLL = {"poll_interval_s": 0.25, "poll_max_interval_s": 1.0}
RENDER_TIMES = (0.0, 0.5)


async def _drive(requests: str, events: str, fake: FakeInvokeAI, render_s: float, count: int) -> dict[str, Any]:
    latencies: list[float] = []
    async with RenderClient(requests, events) as client:
        await client.wait_ready()
        fake.render_s = 0.0
        await client.render(RenderRequest(request_id="warm", prompt="warm", width=512, height=512, project="bench"))
        fake.render_s = render_s
        first = max(fake.items) + 1
        for number in range(count):
            request = RenderRequest(request_id=f"inv-{number}", prompt="x", width=512, height=512, project="bench")
            start = time.perf_counter()
            await client.render(request, timeout=30)
            latencies.append(time.perf_counter() - start - render_s)
    notices = [
        item.observed_at - item.enqueued_at - render_s
        for item_id, item in fake.items.items()
        if item_id >= first and item.observed_at is not None
    ]
    return {"overhead": summary_ms(latencies), "notice": summary_ms(notices)}


def measure(render_s: float, count: int) -> dict[str, Any]:
    with FakeInvokeAI() as fake:
        generators = {"invokeai": {"strategy": "invokeai", "base_url": fake.url, "model": "Juggernaut XL v9", **POLL}}
        with running_service(generators, log_level="warning") as service:
            result = asyncio.run(_drive(service.requests, service.events, fake, render_s, count))
    return {**result, "machine": machine()}


def run(runs: int = 3, count: int = 30) -> dict[str, Any]:
    figures = {}
    for render_s in RENDER_TIMES:
        samples = [measure(render_s, count) for _ in range(runs)]
        figures[f"render_{render_s:g}s"] = {
            "overhead_p50_ms": median_of(samples, "overhead.p50_ms"),
            "overhead_p99_ms": median_of(samples, "overhead.p99_ms"),
            "notice_p50_ms": median_of(samples, "notice.p50_ms"),
            "notice_max_ms": median_of(samples, "notice.max_ms"),
            "runs": samples,
        }
    return {"figure": "invokeai against its fake, sequential", "config": POLL, "requests": count, **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()
    print(json.dumps(run(args.runs, args.requests), indent=2))


if __name__ == "__main__":
    main()
