"""Figure 8: the diffusers strategy on tiny random SD 1.5 and SDXL pipelines, 64x64, 2 steps, CPU.

The pipelines are the tests' (tests/generators/tiny_diffusers.py), built once into a temp dir.
Per family, per run (a fresh service process each):
- first render: from the service's first Heartbeat to the first ImageReady (lazy load included),
  and the service's VmRSS after it;
- sequential: 30 requests one at a time; concurrent: 48 requests, 8 in flight at once
  (concurrency 8: they queue on the one pipeline); delivery ``frames`` (file delivery adds an
  fsync'd write, the same for every strategy);
- overhead: per sequential request, the service's timings.total (and the client's round trip)
  minus the pipeline call's own time,
  which the generator logs at DEBUG ("<id> pipeline <ms> ms", taken on the worker thread around the
  pipeline call; serve_wrapper.py turns on that one logger, the service runs at log level warning);
  the p50 of the differences.

    uv run python benchmarks/bench_diffusers.py [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import burst, machine, median_of, running_service, summary_ms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.generators.tiny_diffusers

from image_server.client import RenderClient  # noqa: E402
from schemas import RenderRequest  # noqa: E402
from tests.generators.tiny_diffusers import build_sd, build_sdxl  # noqa: E402

PIPELINE_LINE = re.compile(r"(\S+) pipeline ([0-9.]+) ms")
ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "BENCH_DEBUG_LOGGERS": "image_server.generators.diffusers.generator",  # only the pipeline-time lines
}


def _requests(prefix: str, count: int) -> list[RenderRequest]:
    return [
        RenderRequest(
            request_id=f"{prefix}-{i}",
            prompt=f"a lighthouse #{i}",
            seed=i,
            width=64,
            height=64,
            steps=2,
            delivery="frames",
        )
        for i in range(count)
    ]


async def _drive(service: Any, sequential: int, concurrent: int) -> dict[str, Any]:
    async with RenderClient(service.requests, service.events) as client:
        await client.wait_ready()
        started = time.perf_counter()
        await burst(client, _requests("first", 1), concurrency=1, timeout=300)
        first_s = time.perf_counter() - started
        rss_kib = service.rss_kib()
        await burst(client, _requests("warm", 3), concurrency=1)
        rows = []  # (request id, round trip ms, service's timings.total ms), one at a time
        started = time.perf_counter()
        for request in _requests("seq", sequential):
            sent = time.perf_counter()
            result = await client.render(request, timeout=120)
            rows.append((request.request_id, (time.perf_counter() - sent) * 1000, result.event.timings.total))
        sequential_s = time.perf_counter() - started
        at_once = await burst(client, _requests("conc", concurrent), concurrency=8)
    pipeline_ms = _pipeline_ms(service.log)
    return {
        "first_render_ms": round(first_s * 1000, 1),
        "rss_after_load_mib": round(rss_kib / 1024, 1),
        "sequential": {
            "images_per_s": round(len(rows) / sequential_s, 2),
            "latency": summary_ms([round_trip / 1000 for _, round_trip, _ in rows]),
        },
        "concurrent8": at_once.figures(),
        "pipeline_p50_ms": _median([pipeline_ms[rid] for rid, _, _ in rows]),
        # Beyond the pipeline call: inside the service (its timings.total), and as the client sees it.
        "service_overhead_p50_ms": _median([total - pipeline_ms[rid] for rid, _, total in rows]),
        "round_trip_overhead_p50_ms": _median([trip - pipeline_ms[rid] for rid, trip, _ in rows]),
    }


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def _pipeline_ms(log: list[str]) -> dict[str, float]:
    found = {}
    for line in log:
        match = PIPELINE_LINE.search(line)
        if match:
            found[match.group(1)] = float(match.group(2))
    return found


def measure(folder: Path, sequential: int, concurrent: int) -> dict[str, Any]:
    generators = {"tiny": {"strategy": "diffusers", "model": str(folder), "device": "cpu", "concurrency": 8}}
    with running_service(generators, wrapper=True, log_level="warning", env=ENV, start_timeout_s=120) as service:
        result = asyncio.run(_drive(service, sequential, concurrent))
    return {**result, "machine": machine()}


def run(runs: int = 3, sequential: int = 30, concurrent: int = 48) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tiny-diffusers-") as tmp:
        folders = {"sd15": build_sd(Path(tmp) / "sd"), "sdxl": build_sdxl(Path(tmp) / "sdxl")}
        for family, folder in folders.items():
            samples = [measure(folder, sequential, concurrent) for _ in range(runs)]
            figures[family] = {
                "first_render_ms": median_of(samples, "first_render_ms"),
                "rss_after_load_mib": median_of(samples, "rss_after_load_mib"),
                "sequential_images_per_s": median_of(samples, "sequential.images_per_s"),
                "sequential_p50_ms": median_of(samples, "sequential.latency.p50_ms"),
                "concurrent8_images_per_s": median_of(samples, "concurrent8.images_per_s"),
                "concurrent8_p50_ms": median_of(samples, "concurrent8.latency.p50_ms"),
                "pipeline_p50_ms": median_of(samples, "pipeline_p50_ms"),
                "service_overhead_p50_ms": median_of(samples, "service_overhead_p50_ms"),
                "round_trip_overhead_p50_ms": median_of(samples, "round_trip_overhead_p50_ms"),
                "runs": samples,
            }
    return {"figure": "diffusers, tiny random pipelines, 64x64, 2 steps, CPU", "families": figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sequential", type=int, default=30)
    parser.add_argument("--concurrent", type=int, default=48)
    args = parser.parse_args()
    print(json.dumps(run(args.runs, args.sequential, args.concurrent), indent=2))


if __name__ == "__main__":
    main()
