"""Figure 1: the service's own cost per request, with a generator that returns a ready image.

The ``ready`` generator (serve_wrapper.py) hands back pre-encoded 64x64 PNG bytes at once;
delivery ``frames`` writes no file. Requests go one after another through RenderClient;
each run is a fresh service process. Reported: the client's round trip (send to
ImageReady) and the service's own ``timings.total`` (receipt to stored), p50/p99, with the
journal on and off.

With metrics on (``[http] enabled``, so Prometheus counters and histograms are updated for
every event) against off: ``median.metrics_cost`` is the relative difference (target < 3 %).

    uv run python benchmarks/bench_overhead.py [--requests 1000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import timeit
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio
from harness import BENCH_DIR, free_port, machine, median_of, now_s, running_service, summary_ms

from image_server.client import RenderClient
from image_server.metrics import ServiceMetrics
from schemas import ImageReady, RenderAccepted, RenderProgress, RenderRequest, Timings, encode_message

TARGET_P50_MS = 0.5
GENERATORS = {"ready": {"strategy": "ready", "concurrency": 8}}


# Client-side arrival of each event, as a breakdown of the round trip: send -> accepted ->
# progress "started" -> progress "storing" -> ImageReady.
STAGES = ("accepted", "started", "storing", "ready")
# The service's own split of timings.total (receipt to slot, generate, store).
SERVICE_STAGES = ("queued", "generate", "store")


def _request(request_id: str) -> RenderRequest:
    return RenderRequest(
        request_id=request_id, prompt="ready", width=64, height=64, delivery="frames", output_format="png"
    )


def _stage(event: Any) -> str | None:
    if isinstance(event, RenderAccepted):
        return "accepted"
    if isinstance(event, RenderProgress) and event.stage in ("started", "storing"):
        return event.stage
    return None


async def _drive(
    requests_endpoint: str,
    events_endpoint: str,
    count: int,
    warmup: int,
    cpu_ns: Callable[[], dict[str, int]] = dict,
) -> dict[str, Any]:
    round_trips: list[float] = []
    service_totals: list[float] = []
    service_stages: dict[str, list[float]] = {stage: [] for stage in SERVICE_STAGES}
    seen: dict[str, float] = {}
    steps: dict[str, list[float]] = {stage: [] for stage in STAGES}

    def on_event(event: Any) -> None:
        stage = _stage(event)
        if stage is not None:
            seen.setdefault(stage, now_s())

    async with RenderClient(requests_endpoint, events_endpoint, on_event=on_event) as client:
        await client.wait_ready()
        cpu_before: dict[str, int] = {}
        for index in range(warmup + count):
            if index == warmup:
                cpu_before = cpu_ns()
            request = _request(f"ovh-{index}")
            seen.clear()
            started = now_s()
            result = await client.render(request, timeout=30)
            seen["ready"] = now_s()
            if index < warmup or len(seen) < len(STAGES):
                continue
            round_trips.append(seen["ready"] - started)
            service_totals.append(result.event.timings.total / 1000.0)
            for stage in SERVICE_STAGES:
                service_stages[stage].append(getattr(result.event.timings, stage) / 1000.0)
            previous = started
            for stage in STAGES:
                steps[stage].append(seen[stage] - previous)
                previous = seen[stage]
        resends = client.resends
        cpu = {group: (ns - cpu_before[group]) / count / 1e6 for group, ns in cpu_ns().items()}
    return {
        "service_cpu_per_request_ms": round(sum(cpu.values()), 3),
        "service_cpu_per_request_by_thread_ms": {group: round(ms, 3) for group, ms in cpu.items()},
        "round_trip": summary_ms(round_trips),
        "service_total": summary_ms(service_totals),
        "steps_p50_ms": {stage: summary_ms(values)["p50_ms"] for stage, values in steps.items()},
        "service_stages_p50_ms": {stage: summary_ms(values)["p50_ms"] for stage, values in service_stages.items()},
        "resends": resends,
    }


async def _echo_round_trips(requests_endpoint: str, events_endpoint: str, replies: int, count: int) -> list[float]:
    context = zmq.asyncio.Context()
    events = context.socket(zmq.SUB)
    events.setsockopt(zmq.SUBSCRIBE, b"")
    events.connect(events_endpoint)
    sender = context.socket(zmq.PUB)
    sender.connect(requests_endpoint)
    message = [b"RenderRequest", encode_message(_request("echo"))[1]]
    try:
        async with asyncio.timeout(30):
            await events.recv_multipart()  # the greeting: our subscription has arrived
            while True:  # until our PUB is connected too (earlier sends are dropped)
                await sender.send_multipart(message)
                if await events.poll(100):
                    break
            for _ in range(replies):
                await events.recv_multipart()
            while await events.poll(50):
                await events.recv_multipart()
            samples = []
            for _ in range(count):
                started = now_s()
                await sender.send_multipart(message)
                for _ in range(replies):
                    await events.recv_multipart()
                samples.append(now_s() - started)
            return samples
    finally:
        context.destroy(linger=0)


def transport_floor(replies: int, count: int) -> dict[str, float | int]:
    """Round trip through a bare zmq.asyncio process that answers with ``replies`` events."""
    requests_endpoint, events_endpoint = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    command = [sys.executable, str(BENCH_DIR / "echo_server.py"), requests_endpoint, events_endpoint, str(replies)]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    try:
        return summary_ms(asyncio.run(_echo_round_trips(requests_endpoint, events_endpoint, replies, count)))
    finally:
        process.terminate()
        process.wait(timeout=10)


def observe_cost_us(repeat: int = 5, number: int = 20_000) -> dict[str, float]:
    """In-process, without the noise of a loaded machine: what the metrics hook adds per
    request (RenderAccepted, two RenderProgress, ImageReady), best of ``repeat``, in us."""
    accepted = RenderAccepted(request_id="r", generator="ready")
    progress = RenderProgress(request_id="r", stage="started", generator="ready")
    timings = Timings(queued=0.1, normalize=0.0, generate=0.1, store=0.2, total=0.4)
    ready = ImageReady(request_id="r", generator="ready", images=[], timings=timings, attempts=1)
    costs = {}
    for label, enabled in (("on", True), ("off", False)):
        metrics = ServiceMetrics(enabled=enabled)

        def one_request(m: ServiceMetrics = metrics) -> None:
            for event in (accepted, progress, progress, ready):
                m.observe(event)

        best = min(timeit.repeat(one_request, number=number, repeat=repeat))
        costs[label] = round(best / number * 1e6, 2)
    return costs


def measure(journal: bool, count: int, warmup: int, log_level: str = "info", metrics: bool = False) -> dict[str, Any]:
    # Metrics are collected only with the HTTP listener on (nothing could read them otherwise).
    http = {"enabled": metrics, "port": free_port() if metrics else 9464}
    with running_service(
        GENERATORS,
        wrapper=True,
        log_level=log_level,
        journal={"enabled": journal},
        heartbeat_interval_s=1.0,
        http=http,
    ) as service:
        result = asyncio.run(_drive(service.requests, service.events, count, warmup, service.thread_cpu_ns))
    return {**result, "machine": machine()}


# (label, journal enabled, service log level, metrics); runs alternate between them so that all
# see the same machine load. "info" is the default level: two log lines per request.
VARIANTS = (
    ("journal_on", True, "info", False),
    ("journal_off", False, "info", False),
    ("journal_on_log_warning", True, "warning", False),
    ("journal_on_metrics", True, "info", True),
)


def run(runs: int = 3, count: int = 1000, warmup: int = 100) -> dict[str, Any]:
    samples: dict[str, list[dict[str, Any]]] = {label: [] for label, *_ in VARIANTS}
    for _ in range(runs):
        for label, journal, level, metrics in VARIANTS:
            samples[label].append(measure(journal, count, warmup, level, metrics))
    medians: dict[str, Any] = {
        label: {
            "round_trip_p50_ms": median_of(values, "round_trip.p50_ms"),
            "round_trip_p99_ms": median_of(values, "round_trip.p99_ms"),
            "service_total_p50_ms": median_of(values, "service_total.p50_ms"),
            "service_total_p99_ms": median_of(values, "service_total.p99_ms"),
            "service_cpu_per_request_ms": median_of(values, "service_cpu_per_request_ms"),
            **{
                f"service_cpu_{group}_ms": median_of(values, f"service_cpu_per_request_by_thread_ms.{group}")
                for group in ("main", "zmq_io", "other")
            },
            **{f"step_{stage}_p50_ms": median_of(values, f"steps_p50_ms.{stage}") for stage in STAGES},
            **{f"service_{s}_p50_ms": median_of(values, f"service_stages_p50_ms.{s}") for s in SERVICE_STAGES},
        }
        for label, values in samples.items()
    }
    floors = {f"floor_{n}_reply": [transport_floor(n, count) for _ in range(runs)] for n in (1, 5)}
    for label, values in floors.items():
        medians[label] = {"p50_ms": median_of(values, "p50_ms"), "p99_ms": median_of(values, "p99_ms")}
    headline = medians["journal_on"]["service_total_p50_ms"]
    on, off = medians["journal_on_metrics"], medians["journal_on"]
    medians["metrics_cost"] = {
        key: round(on[key] / off[key] - 1.0, 4) if off[key] else None
        for key in ("service_total_p50_ms", "round_trip_p50_ms", "service_cpu_per_request_ms")
    }
    hook = observe_cost_us()
    medians["metrics_cost"]["observe_us_per_request"] = hook
    medians["metrics_cost"]["observe_share_of_service_cpu"] = round(
        (hook["on"] - hook["off"]) / 1000.0 / off["service_cpu_per_request_ms"], 4
    )
    return {
        "figure": "service overhead per request, ready image",
        "requests_per_run": count,
        "median": medians,
        "target": f"p50 under {TARGET_P50_MS} ms",
        "met": headline < TARGET_P50_MS,
        "runs": samples,
        "floor_runs": floors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(run(args.runs, args.requests), indent=2))


if __name__ == "__main__":
    main()
