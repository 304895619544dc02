"""Where one request's time goes: a median timeline from the client's send to its result.

The service runs through ``serve_wrapper.py`` with ``BENCH_TIMELINE`` (``timeline.py``
stamps a few points of the request path); the client stamps its send, the arrival of
``RenderAccepted`` and of the result. Every stamp is ``time.perf_counter()``, the machine's
monotonic clock, so client and service stamps share one time line. Printed: for each point,
the median over the requests of its time since the send, in order.

    uv run python benchmarks/bench_timeline.py --case jpeg1024   # mock, 1024x1024 JPEG, file
    uv run python benchmarks/bench_timeline.py --case jpeg64     # mock, 64x64 JPEG, file
    uv run python benchmarks/bench_timeline.py --case ready      # ready 64x64 PNG, frames
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import running_service

from image_server.client import RenderClient
from schemas import RenderRequest

CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "jpeg1024": (
        {"mock": {"strategy": "mock", "style": "simple", "concurrency": 8}},
        {"width": 1024, "height": 1024, "output_format": "jpeg"},
    ),
    "jpeg64": (
        {"mock": {"strategy": "mock", "style": "simple", "concurrency": 8}},
        {"width": 64, "height": 64, "output_format": "jpeg"},
    ),
    "ready": (
        {"ready": {"strategy": "ready", "concurrency": 8}},
        {"width": 64, "height": 64, "output_format": "png", "delivery": "frames"},
    ),
}


async def _drive(service: Any, fields: dict[str, Any], count: int, warmup: int) -> dict[str, list[tuple[str, float]]]:
    client_stamps: dict[str, list[tuple[str, float]]] = {}

    def on_event(event: Any) -> None:
        client_stamps.setdefault(event.request_id, []).append((f"client: {event.type}", time.perf_counter()))

    try:
        client = RenderClient(service.requests, service.events, on_event=on_event, progress=False)
    except TypeError:  # a head from before RenderClient(progress=...), run through PYTHONPATH to compare
        client = RenderClient(service.requests, service.events, on_event=on_event)
    async with client:
        await client.wait_ready()
        for index in range(warmup + count):
            rid = f"{'t' if index >= warmup else 'warm'}-{index}"
            request = RenderRequest(request_id=rid, prompt=f"a lighthouse at dusk #{index}", **fields)
            client_stamps.setdefault(rid, []).append(("client: send", time.perf_counter()))
            await client.render(request, timeout=30)
    return {rid: stamps for rid, stamps in client_stamps.items() if rid.startswith("t-")}


def run(case: str, count: int = 300, warmup: int = 30) -> dict[str, Any]:
    generators, fields = CASES[case]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "timeline.json"
        with running_service(
            generators, wrapper=True, log_level="warning", env={"BENCH_TIMELINE": str(out)}
        ) as service:
            client = asyncio.run(_drive(service, fields, count, warmup))
        service_stamps: dict[str, list[list[Any]]] = json.loads(out.read_text())
    since_send: dict[str, list[float]] = {}
    for rid, stamps in client.items():
        merged = sorted([*stamps, *((name, at) for name, at in service_stamps.get(rid, []))], key=lambda s: s[1])
        sent = next(at for name, at in merged if name == "client: send")
        for name, at in merged:
            since_send.setdefault(name, []).append((at - sent) * 1000)
    rows = sorted(((name, statistics.median(values)) for name, values in since_send.items()), key=lambda r: r[1])
    return {"case": case, "requests": count, "median_ms_since_send": {name: round(ms, 3) for name, ms in rows}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--case", choices=sorted(CASES), default="jpeg1024")
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    result = run(args.case, args.requests)
    for name, ms in result["median_ms_since_send"].items():
        print(f"{ms:8.3f} ms  {name}")


if __name__ == "__main__":
    main()
