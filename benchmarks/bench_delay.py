"""Figure 3: 200 requests to a mock that takes 1 s each; all should be done within 1.5 s.

The mock waits ``delay_s = 1.0`` (an asyncio sleep, like a remote provider) and then draws
a small 256x256 image (style ``simple``, file delivery). Its concurrency and
``limits.max_in_flight`` are 256, so all 200 run at once; wall time is from the first send
to the last ImageReady at the client.

    uv run python benchmarks/bench_delay.py [--runs 3] [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from harness import burst, machine, median_of, running_service

from image_server.client import RenderClient
from schemas import ImageReady, RenderAccepted, RenderProgress, RenderRequest

TARGET_S = 1.5
DELAY_S = 1.0
GENERATORS = {"mock": {"strategy": "mock", "style": "simple", "delay_s": DELAY_S, "concurrency": 256}}
LIMITS = {"max_in_flight": 256, "max_queued": 1000}


class Phases:
    """When (after the first send) the last request was accepted, and started its 1 s."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.seen: dict[str, list[float]] = {"accepted": [], "started": [], "ready": []}

    def on_event(self, event: Any) -> None:
        if not event.request_id.startswith("delay-") or event.request_id == "delay-warm":
            return
        if isinstance(event, RenderAccepted):
            self.seen["accepted"].append(time.perf_counter() - self.t0)
        elif isinstance(event, RenderProgress) and event.stage == "started":
            self.seen["started"].append(time.perf_counter() - self.t0)
        elif isinstance(event, ImageReady):
            self.seen["ready"].append(time.perf_counter() - self.t0)

    def figures(self) -> dict[str, float]:
        return {f"last_{name}_s": round(max(times), 3) for name, times in self.seen.items() if times} | {
            "first_ready_s": round(min(self.seen["ready"]), 3) if self.seen["ready"] else 0.0
        }


async def _drive(requests_endpoint: str, events_endpoint: str, count: int) -> dict[str, Any]:
    requests = [
        RenderRequest(request_id=f"delay-{i}", prompt=f"slow provider #{i}", width=256, height=256)
        for i in range(count)
    ]
    phases = Phases()
    async with RenderClient(requests_endpoint, events_endpoint, on_event=phases.on_event) as client:
        await client.wait_ready()
        # One request first so the generator instance exists and the sockets are warm.
        await client.render(RenderRequest(request_id="delay-warm", prompt="warm", width=256, height=256))
        phases.t0 = time.perf_counter()
        result = (await burst(client, requests, timeout=60)).figures()
    return {**result, "phases": phases.figures()}


def measure(count: int) -> dict[str, Any]:
    with running_service(GENERATORS, log_level="warning", limits=LIMITS) as service:
        result = asyncio.run(_drive(service.requests, service.events, count))
    return {**result, "machine": machine()}


def run(runs: int = 3, count: int = 200) -> dict[str, Any]:
    samples = [measure(count) for _ in range(runs)]
    wall = median_of(samples, "wall_s")
    return {
        "figure": f"{count} requests, mock with {DELAY_S:g} s delay",
        "config": {**GENERATORS["mock"], "limits": LIMITS, "size": "256x256"},
        "median": {
            "wall_s": wall,
            "p50_ms": median_of(samples, "latency.p50_ms"),
            "p99_ms": median_of(samples, "latency.p99_ms"),
            **{key: median_of(samples, f"phases.{key}") for key in samples[0]["phases"]},
        },
        "failures": sum(s["failures"] for s in samples),
        "target": f"all done within {TARGET_S} s",
        "met": wall < TARGET_S and all(s["failures"] == 0 for s in samples),
        "runs": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    print(json.dumps(run(args.runs, args.requests), indent=2))


if __name__ == "__main__":
    main()
