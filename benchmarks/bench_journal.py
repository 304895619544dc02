"""Figure 6: what the journal costs: mock throughput with it on and off, and send-to-accepted.

Bursts of 500 small requests (mock, 64x64, style ``simple``, file delivery; mock
concurrency and ``limits.max_in_flight`` 64) are sent at once, three per service process
after a warm-up, with ``journal.enabled`` true and false, alternating processes so both see
the same machine load. The time from sending a request
to its ``RenderAccepted`` (seen through RenderClient's ``on_event``) is reported for the
burst and for requests sent one at a time, where the journal write is on the path.

    uv run python benchmarks/bench_journal.py [--runs 3] [--burst 500] [--sequential 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from harness import burst, machine, median_of, running_service, summary_ms

from image_server.client import RenderClient
from schemas import RenderAccepted, RenderRequest

TARGET_COST = 0.10
GENERATORS = {"mock": {"strategy": "mock", "style": "simple", "concurrency": 64}}
LIMITS = {"max_in_flight": 64, "max_queued": 2000}
BURSTS_PER_PROCESS = 3  # throughput is their median: one burst varies by +-15% on this machine


class AcceptTimer:
    """Send and RenderAccepted times per request id (the first of each)."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self.accepted: dict[str, float] = {}

    def on_event(self, event: Any) -> None:
        if isinstance(event, RenderAccepted):
            self.accepted.setdefault(event.request_id, time.perf_counter())

    def requests(self, prefix: str, count: int) -> list[RenderRequest]:
        return [
            RenderRequest(request_id=f"{prefix}-{i}", prompt=f"small #{i}", width=64, height=64) for i in range(count)
        ]

    def mark(self, requests: list[RenderRequest]) -> None:
        now = time.perf_counter()
        for request in requests:
            self.sent[request.request_id] = now

    def delays(self, prefix: str) -> list[float]:
        return [
            self.accepted[rid] - sent
            for rid, sent in self.sent.items()
            if rid.startswith(prefix) and rid in self.accepted
        ]


async def _drive(requests_endpoint: str, events_endpoint: str, size: int, sequential: int) -> dict[str, Any]:
    timer = AcceptTimer()
    async with RenderClient(requests_endpoint, events_endpoint, on_event=timer.on_event) as client:
        await client.wait_ready()
        # Warm up: the executor's threads, the generator instance, the journal's first pages.
        await burst(client, timer.requests("warm", 100), timeout=120)
        one_by_one = timer.requests("seq", sequential)
        for request in one_by_one:
            timer.mark([request])
            await client.render(request, timeout=30)
        bursts = []
        for index in range(BURSTS_PER_PROCESS):
            at_once = timer.requests(f"burst{index}", size)
            timer.mark(at_once)  # every send happens before the first await yields
            bursts.append((await burst(client, at_once, timeout=120)).figures())
    return {
        "bursts": bursts,
        "images_per_s": statistics.median(b["images_per_s"] for b in bursts),
        "burst_p50_ms": statistics.median(b["latency"]["p50_ms"] for b in bursts),
        "resends": sum(b["resends"] for b in bursts),
        "failures": sum(b["failures"] for b in bursts),
        "accept_sequential": summary_ms(timer.delays("seq-")),
        "accept_burst": summary_ms(timer.delays("burst")),
    }


def measure(journal: bool, size: int, sequential: int) -> dict[str, Any]:
    with running_service(GENERATORS, log_level="warning", limits=LIMITS, journal={"enabled": journal}) as service:
        result = asyncio.run(_drive(service.requests, service.events, size, sequential))
    return {**result, "machine": machine()}


def run(runs: int = 3, size: int = 500, sequential: int = 300) -> dict[str, Any]:
    samples: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    for _ in range(runs):
        for label in ("on", "off"):
            samples[label].append(measure(label == "on", size, sequential))
    medians = {
        label: {
            "images_per_s": median_of(runs_, "images_per_s"),
            "burst_p50_ms": median_of(runs_, "burst_p50_ms"),
            "accept_sequential_p50_ms": median_of(runs_, "accept_sequential.p50_ms"),
            "accept_sequential_p99_ms": median_of(runs_, "accept_sequential.p99_ms"),
            "accept_burst_p50_ms": median_of(runs_, "accept_burst.p50_ms"),
            "resends": median_of(runs_, "resends"),
        }
        for label, runs_ in samples.items()
    }
    cost = 1.0 - medians["on"]["images_per_s"] / medians["off"]["images_per_s"]
    # Each on/off pair ran back to back; their ratios show how far the machine drifted.
    paired = [
        1.0 - on["images_per_s"] / off["images_per_s"] for on, off in zip(samples["on"], samples["off"], strict=True)
    ]
    return {
        "figure": f"journal on vs off, burst of {size} small mock requests",
        "config": {**GENERATORS["mock"], "limits": LIMITS, "size": "64x64", "delivery": "file"},
        "median": {
            "journal_on": medians["on"],
            "journal_off": medians["off"],
            "throughput_cost": round(cost, 3),
            "paired_costs": [round(c, 3) for c in paired],
        },
        "bursts_per_process": BURSTS_PER_PROCESS,
        "failures": sum(s["failures"] for runs_ in samples.values() for s in runs_),
        "target": f"journal costs under {TARGET_COST:.0%} of throughput",
        "met": cost < TARGET_COST,
        "runs": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--burst", type=int, default=500)
    parser.add_argument("--sequential", type=int, default=300)
    args = parser.parse_args()
    print(json.dumps(run(args.runs, args.burst, args.sequential), indent=2))


if __name__ == "__main__":
    main()
