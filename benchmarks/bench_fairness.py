"""Figure 11: a second client's latency while another floods the service with 2,000 requests.

Default limits (``max_in_flight`` 32, ``max_queued`` 1000, and whatever per-client share
the service applies by default); the mock takes 50 ms per image (``delay_s``, style
``simple``, 256x256, concurrency 8). The flooding client sends 2,000 requests at once; 0.5 s
later a second client renders 5 requests one after the other. Its latency counts from its
first send to its ImageReady; a request refused with ``overloaded`` is sent again under a
new id 50 ms later, and the wait counts.

    uv run python benchmarks/bench_fairness.py [--runs 3] [--flood 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from typing import Any

from harness import machine, median_of, running_service

from image_server.client import RenderClient, RenderFailed
from schemas import RenderRequest

GENERATORS = {"mock": {"strategy": "mock", "style": "simple", "delay_s": 0.05, "concurrency": 8}}
POLITE_REQUESTS = 5


async def _polite_one(client: RenderClient) -> tuple[float, int]:
    started = time.perf_counter()
    refused = 0
    while True:
        request = RenderRequest(request_id=f"polite-{uuid.uuid4().hex[:8]}", prompt="p", width=256, height=256)
        try:
            await client.render(request, timeout=120)
            return time.perf_counter() - started, refused
        except RenderFailed as exc:
            if exc.code != "overloaded":
                raise
            refused += 1
            await asyncio.sleep(0.05)


async def _drive(requests: str, events: str, flood: int) -> dict[str, Any]:
    async with (
        RenderClient(requests, events, client_id="flood") as flooder,
        RenderClient(requests, events, client_id="polite") as polite,
    ):
        await flooder.wait_ready()
        await polite.wait_ready()
        outcomes: dict[str, int] = {"ok": 0, "overloaded": 0, "other": 0}

        async def one(index: int) -> None:
            request = RenderRequest(request_id=f"flood-{index}", prompt="p", width=256, height=256)
            try:
                await flooder.render(request, timeout=300)
                outcomes["ok"] += 1
            except RenderFailed as exc:
                outcomes["overloaded" if exc.code == "overloaded" else "other"] += 1

        flooding = asyncio.gather(*(one(i) for i in range(flood)))
        await asyncio.sleep(0.5)
        latencies, refusals = [], 0
        for _ in range(POLITE_REQUESTS):
            latency, refused = await _polite_one(polite)
            latencies.append(latency)
            refusals += refused
        polite_done = time.perf_counter()
        await flooding
        flood_left_s = time.perf_counter() - polite_done
    return {
        "polite_p50_s": round(statistics.median(latencies), 3),
        "polite_max_s": round(max(latencies), 3),
        "polite_refusals": refusals,
        "flood": outcomes,
        "flood_still_running_after_polite_s": round(flood_left_s, 3),
    }


def measure(flood: int) -> dict[str, Any]:
    with running_service(GENERATORS, log_level="warning") as service:
        result = asyncio.run(_drive(service.requests, service.events, flood))
    return {**result, "machine": machine()}


def run(runs: int = 3, flood: int = 2000) -> dict[str, Any]:
    samples = [measure(flood) for _ in range(runs)]
    return {
        "figure": f"second client's latency under a {flood}-request flood",
        "config": {**GENERATORS["mock"], "limits": "defaults", "size": "256x256"},
        "median": {
            "polite_p50_s": median_of(samples, "polite_p50_s"),
            "polite_max_s": median_of(samples, "polite_max_s"),
            "polite_refusals": median_of(samples, "polite_refusals"),
            "flood_ok": median_of(samples, "flood.ok"),
            "flood_overloaded": median_of(samples, "flood.overloaded"),
        },
        "runs": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--flood", type=int, default=2000)
    args = parser.parse_args()
    print(json.dumps(run(args.runs, args.flood), indent=2))


if __name__ == "__main__":
    main()
