"""Shared pieces of the benchmarks: a service subprocess with a temp config, and statistics.

Every benchmark runs the service as its own process (``python -m image_server serve`` or
``benchmarks/serve_wrapper.py``) and drives it through real sockets from this process, so
service and client never share an event loop or a GIL.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from image_server.client import RenderClient, RenderFailed
from schemas import RenderRequest

BENCH_DIR = Path(__file__).resolve().parent
WRAPPER = BENCH_DIR / "serve_wrapper.py"


# -- scratch folders ----------------------------------------------------------------

# Removed when the benchmark process ends, not between its rounds. This machine's root file
# system is ext4 without a journal, where creating a file skips every inode deleted in the
# last 60 s (360 s while the inode table is not yet written back): deleting a round's ~1,400
# images made the next rounds' file creation, hence their figures, up to 25 % slower
# (benchmarks/README.md, "File creation on this machine").
_SCRATCH: list[Path] = []


def scratch_dir(prefix: str) -> Path:
    """A new temp folder, removed at exit."""
    if not _SCRATCH:
        atexit.register(_remove_scratch)
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    _SCRATCH.append(folder)
    return folder


def _remove_scratch() -> None:
    for folder in _SCRATCH:
        shutil.rmtree(folder, ignore_errors=True)


def file_create_us(count: int = 20) -> float:
    """Median microseconds to create (and write 26 KB to, no fsync) a new file in a scratch
    folder: how much the file system's recent deletions cost a new output file right now
    (about 35 us when nothing was deleted recently; hundreds after mass deletions)."""
    folder = scratch_dir("image-server-probe-")
    data = b"\0" * 26_000
    times = []
    for index in range(count):
        started = time.perf_counter()
        fd = os.open(folder / f"probe-{index}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1e6, 1)


# -- config ---------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Enough TOML for a config: scalars, lists and nested tables."""
    scalars = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    lines = scalars[:]
    for key, value in data.items():
        if isinstance(value, Mapping):
            name = f"{prefix}{key}"
            lines += ["", f"[{name}]", to_toml(value, prefix=f"{name}.")]
    return "\n".join(lines)


def free_port() -> int:
    """A port nothing listens on now (the service binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def write_config(
    folder: Path, *, generators: Mapping[str, Mapping[str, Any]], requests: str, events: str, **overrides: Any
) -> Path:
    """A config in ``folder`` with the given loopback endpoints and state/output under it."""
    data: dict[str, Any] = {
        "service_id": "bench",
        "state_dir": str(folder / "state"),
        "output_dir": str(folder / "output"),
        "default_generator": next(iter(generators)),
        "heartbeat_interval_s": 0.5,
        "shutdown_timeout_s": 5.0,
        "sockets": {"requests": {"kind": "sub", "bind": requests}, "events": {"kind": "xpub", "bind": events}},
    }
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(data.get(key), Mapping):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    data["generators"] = generators
    path = folder / "config.toml"
    path.write_text(to_toml(data) + "\n")
    return path


# -- the service process --------------------------------------------------------------


@dataclass
class ServiceProcess:
    process: subprocess.Popen[bytes]
    requests: str
    events: str
    folder: Path
    log: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def thread_cpu_ns(self) -> dict[str, int]:
        """CPU time so far per thread group, from /proc/<pid>/task/*/schedstat (ns, exact):
        ``main`` (the event loop), ``zmq_io`` (libzmq's I/O threads), ``other`` (the
        journal writer and the executor's workers) and ``children`` (the service's child
        processes, such as the mock's drawing processes, all their threads)."""
        totals = {"main": 0, "zmq_io": 0, "other": 0, "children": 0}
        children: list[str] = []
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                runtime = int((task / "schedstat").read_text().split()[0])
                name = (task / "comm").read_text().strip()
                children += (task / "children").read_text().split()
            except FileNotFoundError:  # the thread ended meanwhile
                continue
            group = "main" if task.name == str(self.pid) else "zmq_io" if name.startswith("ZMQbg/IO") else "other"
            totals[group] += runtime
        for child in children:
            try:
                totals["children"] += sum(
                    int((task / "schedstat").read_text().split()[0]) for task in Path(f"/proc/{child}/task").iterdir()
                )
            except FileNotFoundError:  # the child ended meanwhile
                continue
        return totals

    def rss_kib(self) -> int:
        """VmRSS from /proc/<pid>/status, in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS line")


def _drain(stream: Any, log: list[str]) -> None:
    """Read the service's stderr to the end (a full pipe would block its logging)."""
    for raw in iter(stream.readline, b""):
        log.append(raw.decode(errors="replace").rstrip())


def wait_for_heartbeat(events: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Block until the service publishes a Heartbeat (it is serving), or fail if it exits."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"Heartbeat")
    sub.connect(events)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"service exited with {process.returncode} before serving")
            if sub.poll(100):
                sub.recv_multipart()
                return
        raise RuntimeError(f"no Heartbeat from the service within {timeout_s} s")
    finally:
        sub.close(linger=0)


@contextlib.contextmanager
def running_service(
    generators: Mapping[str, Mapping[str, Any]],
    *,
    wrapper: bool = False,
    log_level: str = "info",
    env: Mapping[str, str] | None = None,
    start_timeout_s: float = 30.0,
    **overrides: Any,
) -> Iterator[ServiceProcess]:
    """Start the service in a temp dir, yield once it heartbeats, SIGTERM it after. The dir
    (and the images in it) is removed when this process ends (``scratch_dir``)."""
    folder = scratch_dir("image-server-bench-")
    entry = [str(WRAPPER)] if wrapper else ["-m", "image_server"]
    for attempt in range(3):
        requests, events = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
        config = write_config(folder, generators=generators, requests=requests, events=events, **overrides)
        command = [sys.executable, *entry, "--config", str(config), "--log-level", log_level, "serve"]
        process = subprocess.Popen(
            command,
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        log: list[str] = []
        reader = threading.Thread(target=_drain, args=(process.stderr, log), daemon=True)
        reader.start()
        try:
            wait_for_heartbeat(events, process, start_timeout_s)
            break
        except RuntimeError as exc:
            process.kill()
            process.wait()
            reader.join(timeout=5)
            # free_port's port can be taken again before the service binds it: new ports.
            if attempt < 2 and any("Address already in use" in line for line in log):
                continue
            raise RuntimeError(f"{exc}; its log ends:\n" + "\n".join(log[-30:])) from None
    try:
        yield ServiceProcess(process, requests, events, folder, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(timeout=5)


# -- statistics -----------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p99/max in milliseconds of a list of durations in seconds."""
    ms = [s * 1000.0 for s in seconds]
    return {
        "p50_ms": round(percentile(ms, 50), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "max_ms": round(max(ms), 3),
        "n": len(ms),
    }


def median_of(runs: Sequence[Mapping[str, Any]], key: str) -> float:
    """The median over runs of a numeric field (dotted path for nested dicts)."""
    values = []
    for run in runs:
        node: Any = run
        for part in key.split("."):
            node = node[part]
        values.append(float(node))
    return round(statistics.median(values), 3)


def now_s() -> float:
    return time.perf_counter()


# -- driving the service ----------------------------------------------------------------


@dataclass
class Burst:
    """What a burst of concurrent requests measured at the client."""

    wall_s: float
    latencies: list[float]
    failures: list[str]
    resends: int

    def figures(self) -> dict[str, Any]:
        count = len(self.latencies)
        return {
            "requests": count + len(self.failures),
            "failures": len(self.failures),
            "failure_sample": self.failures[:3],
            "wall_s": round(self.wall_s, 3),
            "images_per_s": round(count / self.wall_s, 2) if self.wall_s > 0 else 0.0,
            "latency": summary_ms(self.latencies) if self.latencies else {},
            "resends": self.resends,
        }


async def burst(
    client: RenderClient, requests: Sequence[RenderRequest], *, concurrency: int | None = None, timeout: float = 120
) -> Burst:
    """Send ``requests`` at once (or ``concurrency`` at a time); latency is per request."""
    limit = asyncio.Semaphore(concurrency or len(requests))
    latencies: list[float] = []
    failures: list[str] = []
    resends_before = client.resends

    async def one(request: RenderRequest) -> None:
        async with limit:
            started = time.perf_counter()
            try:
                await client.render(request, timeout=timeout)
            except (RenderFailed, TimeoutError) as exc:
                failures.append(str(exc))
                return
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one(request) for request in requests))
    return Burst(time.perf_counter() - started, latencies, failures, client.resends - resends_before)


def machine() -> dict[str, Any]:
    """Load and CPU count when a figure was taken: the machine is shared, so say how busy."""
    return {"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2), "file_create_us": file_create_us()}
