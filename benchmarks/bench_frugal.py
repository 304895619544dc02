"""Spend less, wait less (issue 16): cache hits, hedging a slow tail, Ollama's round trip.

The service runs as its own process (``harness.running_service``); this process drives it
through real sockets with ``RenderClient``.

- ``cache``: mock style ``detailed``, 1024x1024 PNG, delivery ``frames``. One render fills the
  cache, then ``--requests`` sequential requests with the same parameters (new request_ids,
  ``cache: true``) are answered from it: client round trip and the service's timings.total.
- ``hedge``: a mock whose attempts take 50 ms, 4 % of them 1 s more (``tail_rate``,
  ``tail_delay_s``); the same as its hedge generator (its own draws). Waves of 20 concurrent
  requests, ``--hedge-requests`` in all after 40 of warm-up (the p95 is measured over them),
  once with ``[hedging]`` off and once on; p50/p99 latency at the client.
- ``ollama``: the fake Ollama (tests/fakes/ollama.py) in this process, answering after
  ``delay_s`` (the model's own time); a mock with ``max_prompt_chars = 40`` and the prompt
  policy ``compress``. Alternating requests with a long prompt (compressed) and a short one
  (no call); overhead = long round trip - short round trip - the model's time.

    uv run python benchmarks/bench_frugal.py [--only cache hedge ollama] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import machine, median_of, running_service, summary_ms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, for tests.fakes

from PIL import Image  # noqa: E402

from image_server.client import RenderClient  # noqa: E402
from tests.fakes.ollama import FakeOllama  # noqa: E402

LONG_PROMPT = "a very very red fox with a bushy tail in the snow, the snow, the red fox, in watercolor"
MODEL_S = 0.2


async def _cache(requests: str, events: str, count: int, sized: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {"prompt": "a fox in the snow", "seed": 1, "delivery": "frames"}
    if sized:
        fields.update(width=1024, height=1024)
    async with RenderClient(requests, events) as client:
        await client.wait_ready()
        started = time.perf_counter()
        first = await client.render(request_id="fill", cache=True, **fields)
        render_s = time.perf_counter() - started
        latencies, service = [], []
        for number in range(count):
            started = time.perf_counter()
            hit = await client.render(request_id=f"hit-{number}", cache=True, **fields)
            latencies.append(time.perf_counter() - started)
            service.append(hit.event.timings.total / 1000)
            assert hit.event.cached and hit.image_bytes() == first.image_bytes()
    return {
        "image_bytes": len(first.image_bytes() or b""),
        "first_render_ms": round(render_s * 1000, 3),
        "round_trip": summary_ms(latencies),
        "service_total": summary_ms(service),
    }


def measure_cache(count: int, noise: bool, journal: bool = True) -> dict[str, Any]:
    """``noise``: a 1024x1024 PNG of random pixels (about 3 MiB, like a photograph) served from
    a folder; else the mock's own ``detailed`` drawing (gradients and shapes: small PNGs)."""
    with tempfile.TemporaryDirectory() as images:
        generators: dict[str, Any] = {"mock": {"strategy": "mock", "style": "detailed"}}
        if noise:
            Image.frombytes("RGB", (1024, 1024), os.urandom(1024 * 1024 * 3)).save(Path(images) / "noise.png")
            generators["mock"]["image_dir"] = images
        with running_service(generators, log_level="warning", journal={"enabled": journal}) as service:
            return {**asyncio.run(_cache(service.requests, service.events, count, not noise)), "machine": machine()}


async def _hedge(requests: str, events: str, count: int, wave: int) -> dict[str, Any]:
    async with RenderClient(requests, events) as client:
        await client.wait_ready()

        hedged: list[int] = []

        async def one(number: int) -> float:
            started = time.perf_counter()
            done = await client.render(request_id=f"h-{number}", prompt="p", width=64, height=64, timeout=60)
            if "hedge" in done.event.applied and number >= 40:
                hedged.append(number)
            return time.perf_counter() - started

        latencies: list[float] = []
        for start in range(0, 40 + count, wave):
            batch = await asyncio.gather(*(one(n) for n in range(start, min(start + wave, 40 + count))))
            if start >= 40:
                latencies.extend(batch)
    return {"latency": summary_ms(latencies), "hedged_share": round(len(hedged) / count, 3)}


def measure_hedge(count: int, hedged: bool) -> dict[str, Any]:
    slow = {"strategy": "mock", "delay_s": 0.05, "tail_rate": 0.04, "tail_delay_s": 1.0, "concurrency": 64}
    generators = {"tail": slow, "backup": dict(slow)}
    hedging = {"tail": {"hedge": "backup", "min_samples": 20}} if hedged else {}
    with running_service(generators, log_level="warning", hedging=hedging) as service:
        return {**asyncio.run(_hedge(service.requests, service.events, count, 20)), "machine": machine()}


async def _ollama(requests: str, events: str, count: int) -> dict[str, Any]:
    long_s, short_s = [], []
    async with RenderClient(requests, events) as client:
        await client.wait_ready()
        for number in range(count + 2):
            for prompt, into in ((LONG_PROMPT, long_s), ("a fox", short_s)):
                started = time.perf_counter()
                done = await client.render(request_id=f"o-{number}-{len(prompt)}", prompt=prompt, width=64, height=64)
                if number >= 2:  # after warm-up (connections, first model call)
                    into.append(time.perf_counter() - started)
                if prompt == LONG_PROMPT:
                    assert done.event.applied["prompt_policy"] == "compressed", done.event.applied
    overhead = [a - b - MODEL_S for a, b in zip(sorted(long_s), sorted(short_s), strict=True)]
    return {"long": summary_ms(long_s), "short": summary_ms(short_s), "overhead": summary_ms(overhead)}


def measure_ollama(count: int) -> dict[str, Any]:
    with FakeOllama() as fake:
        fake.delay_s = MODEL_S
        generators = {"mock": {"strategy": "mock", "max_prompt_chars": 40}}
        prompting = {"on_too_long": "compress", "ollama": {"url": fake.base_url}}
        with running_service(generators, log_level="warning", prompting=prompting) as service:
            return {**asyncio.run(_ollama(service.requests, service.events, count)), "machine": machine()}


def run(only: list[str], runs: int, requests: int, hedge_requests: int) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    if "cache" in only:
        # The journal keeps a frames answer's bytes (to re-publish a repeat): 3 MiB per hit.
        for label, noise, journal in (("drawn", False, True), ("noise", True, True), ("noise_no_journal", True, False)):
            samples = [measure_cache(requests, noise, journal) for _ in range(runs)]
            figures[f"cache_hit_1024_frames_{label}"] = {
                "image_bytes": median_of(samples, "image_bytes"),
                "round_trip_p50_ms": median_of(samples, "round_trip.p50_ms"),
                "round_trip_p99_ms": median_of(samples, "round_trip.p99_ms"),
                "service_total_p50_ms": median_of(samples, "service_total.p50_ms"),
                "first_render_ms": median_of(samples, "first_render_ms"),
                "runs": samples,
            }
    if "hedge" in only:
        pairs = [(measure_hedge(hedge_requests, False), measure_hedge(hedge_requests, True)) for _ in range(runs)]
        for label, index in (("without_hedging", 0), ("with_hedging", 1)):
            samples = [pair[index] for pair in pairs]
            figures[f"tail_{label}"] = {
                "p50_ms": median_of(samples, "latency.p50_ms"),
                "p99_ms": median_of(samples, "latency.p99_ms"),
                "hedged_share": median_of(samples, "hedged_share"),
                "runs": samples,
            }
    if "ollama" in only:
        samples = [measure_ollama(requests // 4) for _ in range(runs)]
        figures["ollama_overhead"] = {
            "model_s": MODEL_S,
            "overhead_p50_ms": median_of(samples, "overhead.p50_ms"),
            "overhead_p99_ms": median_of(samples, "overhead.p99_ms"),
            "runs": samples,
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", default=["cache", "hedge", "ollama"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--hedge-requests", type=int, default=300)
    args = parser.parse_args()
    print(json.dumps(run(args.only, args.runs, args.requests, args.hedge_requests), indent=2))


if __name__ == "__main__":
    main()
