"""Issue 14: the cost of one request, on the equal-work set-up of the server we replace.

Equal work: mock generator, style ``simple`` (a solid colour with the prompt drawn),
1024x1024, JPEG, file delivery (a file per image), 200 requests, medians of 3 rounds, each
round a fresh service process. Per round:

- sequential: 200 requests one after another: images/s, round trip p50/p99, and the CPU
  the service process used per request (all threads, from /proc schedstat);
- burst: 200 requests sent at once: images/s;
- small: 200 sequential 64x64 JPEGs (same set-up otherwise) and, in the same round, the bare
  ZeroMQ floor (``echo_server.py``, one reply per message): round trip above the floor;
- overhead: the ``ready`` generator (``serve_wrapper.py``: a 64x64 PNG returned at once,
  delivery ``frames``), 1,000 sequential requests: the service's ``timings.total`` minus
  ``timings.generate`` (everything but the generator's own work), journal on.

``--before CHECKOUT`` runs the rounds alternately against another checkout's service (ABBA,
one process) and prints both medians and the median of the paired ratios.

``--rss`` adds one process serving 5,000 sequential 1024x1024 JPEGs, VmRSS sampled at
requests 200, 1,000, 2,000, ... 5,000; ``--jitter`` adds ``bench_jitter.run`` (heartbeat
jitter idle and while ten 4096x4096 references are normalized).

    uv run python benchmarks/bench_per_request.py [--runs 3] [--rss] [--jitter]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_overhead import transport_floor
from harness import burst, machine, median_of, now_s, running_service, summary_ms

from image_server.client import RenderClient
from schemas import RenderRequest

REQUESTS = 200
# Concurrency of the mock: the shipped config's 8; the burst queues the rest on the slots.
GENERATORS = {"mock": {"strategy": "mock", "style": "simple", "concurrency": 8}}
READY = {"ready": {"strategy": "ready", "concurrency": 8}}
# The other server's figures, measured on this kind of machine (issue 14).
THEIRS = {
    "sequential_images_per_s": 235.9,
    "sequential_p50_ms": 4.20,
    "sequential_p99_ms": 4.77,
    "burst_images_per_s": 262.0,
    "small_above_floor_ms": 2.30,
    "cpu_per_request_ms": 3.1,
}


def _jpeg(prefix: str, count: int, side: int = 1024) -> list[RenderRequest]:
    return [
        RenderRequest(
            request_id=f"{prefix}-{i}",
            prompt=f"a lighthouse at dusk #{i}",
            width=side,
            height=side,
            output_format="jpeg",
        )
        for i in range(count)
    ]


async def _sequential(client: RenderClient, requests: list[RenderRequest]) -> list[float]:
    round_trips = []
    for request in requests:
        started = now_s()
        await client.render(request, timeout=30)
        round_trips.append(now_s() - started)
    return round_trips


async def _drive(service: Any, count: int) -> dict[str, Any]:
    async with RenderClient(service.requests, service.events) as client:
        await client.wait_ready()
        await _sequential(client, _jpeg("warm", 20))
        cpu_before = service.thread_cpu_ns()
        started = now_s()
        round_trips = await _sequential(client, _jpeg("seq", count))
        wall = now_s() - started
        cpu = {k: (v - cpu_before[k]) / count / 1e6 for k, v in service.thread_cpu_ns().items()}
        at_once = await burst(client, _jpeg("burst", count), timeout=120)
        small = await _sequential(client, _jpeg("small", count, side=64))
    return {
        "sequential": {"images_per_s": round(count / wall, 1), "round_trip": summary_ms(round_trips)},
        "cpu_per_request_ms": round(sum(cpu.values()), 3),
        "cpu_per_request_by_thread_ms": {k: round(v, 3) for k, v in cpu.items()},
        "burst": at_once.figures(),
        "small_round_trip": summary_ms(small),
    }


async def _overhead(service: Any, count: int, warmup: int) -> dict[str, Any]:
    async with RenderClient(service.requests, service.events) as client:
        await client.wait_ready()
        own: list[float] = []
        for index in range(warmup + count):
            request = RenderRequest(
                request_id=f"ovh-{index}", prompt="ready", width=64, height=64, delivery="frames", output_format="png"
            )
            result = await client.render(request, timeout=30)
            if index >= warmup:
                timings = result.event.timings
                own.append((timings.total - timings.generate) / 1000.0)
    return summary_ms(own)


def measure(count: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    with running_service(GENERATORS, log_level="warning", env=env) as service:
        result = asyncio.run(_drive(service, count))
    floor = transport_floor(1, count)
    result["zmq_floor"] = floor
    result["small_above_floor_ms"] = round(result["small_round_trip"]["p50_ms"] - floor["p50_ms"], 3)
    with running_service(READY, wrapper=True, log_level="warning", env=env) as service:
        result["overhead"] = asyncio.run(_overhead(service, 1000, 100))
    return {**result, "machine": machine()}


def compare(before: Path, runs: int, count: int = REQUESTS) -> dict[str, Any]:
    """This tree against the service in ``before`` (another checkout, imported through
    ``PYTHONPATH`` by the service processes only), rounds alternating ABBA in one process,
    so both sides see the same machine and no round pays for another's deleted files."""
    old = {"PYTHONPATH": os.pathsep.join([str(before), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    samples: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    for index in range(runs):
        for side in ("before", "after") if index % 2 == 0 else ("after", "before"):
            samples[side].append(measure(count, old if side == "before" else None))
    medians = {side: _summary(found) for side, found in samples.items()}
    pairs = list(zip(samples["after"], samples["before"], strict=True))
    ratios = {
        name: round(statistics.median(_summary([a])[name] / _summary([b])[name] for a, b in pairs), 3)
        for name in medians["after"]
        if name != "loadavg_1m"
    }
    return {
        "figure": f"per-request cost, this tree against {before}, {runs} alternating rounds",
        "median": medians,
        "median_ratio_after_over_before": ratios,
        "file_create_us": {side: [s["machine"]["file_create_us"] for s in found] for side, found in samples.items()},
        "failures": sum(s["burst"]["failures"] for found in samples.values() for s in found),
    }


def rss_trace(total: int = 5000, marks: tuple[int, ...] = (200, 1000, 2000, 3000, 4000, 5000)) -> dict[str, Any]:
    """VmRSS (MB) of one service process after ``marks`` sequential 1024x1024 JPEGs."""
    env = {k: v for k, v in os.environ.items() if k == "MALLOC_ARENA_MAX"}
    with running_service(GENERATORS, log_level="warning", env=env) as service:
        trace: dict[int, float] = {}

        async def drive() -> None:
            async with RenderClient(service.requests, service.events) as client:
                await client.wait_ready()
                done = 0
                for mark in marks:
                    await _sequential(client, _jpeg(f"rss{mark}", mark - done))
                    done = mark
                    trace[mark] = round(service.rss_kib() / 1024, 1)

        asyncio.run(drive())
    return {"rss_mb": trace, "growth_200_to_last_mb": round(trace[marks[-1]] - trace[marks[0]], 1)}


def _summary(samples: list[dict[str, Any]]) -> dict[str, float]:
    paths: dict[str, str] = {
        "sequential_images_per_s": "sequential.images_per_s",
        "sequential_p50_ms": "sequential.round_trip.p50_ms",
        "sequential_p99_ms": "sequential.round_trip.p99_ms",
        "burst_images_per_s": "burst.images_per_s",
        "small_round_trip_p50_ms": "small_round_trip.p50_ms",
        "zmq_floor_p50_ms": "zmq_floor.p50_ms",
        "small_above_floor_ms": "small_above_floor_ms",
        "cpu_per_request_ms": "cpu_per_request_ms",
        "overhead_p50_ms": "overhead.p50_ms",
        "overhead_p99_ms": "overhead.p99_ms",
        "loadavg_1m": "machine.loadavg_1m",
        "file_create_us": "machine.file_create_us",
    }
    return {name: median_of(samples, path) for name, path in paths.items()}


def _ratios(median: dict[str, float]) -> dict[str, float]:
    ratio: Callable[[str], float] = lambda key: round(median[key] / THEIRS[key], 2)  # noqa: E731
    return {key: ratio(key) for key in THEIRS}


def run(runs: int = 3, count: int = REQUESTS, rss: bool = False, jitter: bool = False) -> dict[str, Any]:
    samples = [measure(count) for _ in range(runs)]
    median = _summary(samples)
    result: dict[str, Any] = {
        "figure": "per-request cost, mock simple 1024x1024 JPEG, file delivery",
        "median": median,
        "ratio_to_theirs": _ratios(median),
        "p99_over_p50": round(median["sequential_p99_ms"] / median["sequential_p50_ms"], 2),
        "failures": sum(s["burst"]["failures"] for s in samples),
        "runs": samples,
    }
    if rss:
        result["rss"] = rss_trace()
    if jitter:
        from bench_jitter import run as jitter_run

        result["jitter"] = jitter_run(runs)["median"]
    result["loadavg_after"] = round(os.getloadavg()[0], 2)
    result["spread_sequential_images_per_s"] = sorted(s["sequential"]["images_per_s"] for s in samples)
    result["spread_burst_images_per_s"] = sorted(s["burst"]["images_per_s"] for s in samples)
    result["median_cpu_main_ms"] = round(
        statistics.median(s["cpu_per_request_by_thread_ms"]["main"] for s in samples), 3
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=REQUESTS)
    parser.add_argument("--rss", action="store_true")
    parser.add_argument("--jitter", action="store_true")
    parser.add_argument("--full", action="store_true", help="every round's figures too")
    parser.add_argument("--before", type=Path, metavar="CHECKOUT", help="alternate with this checkout's service")
    args = parser.parse_args()
    if args.before is not None:
        print(json.dumps(compare(args.before.resolve(), args.runs, args.requests), indent=2))
        return
    result = run(args.runs, args.requests, args.rss, args.jitter)
    print(json.dumps(result if args.full else {k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
