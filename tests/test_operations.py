"""Running under a supervisor, through the real CLI: health command, logs, signals, a full disk."""

from __future__ import annotations

import asyncio
import json
import re
import resource
import signal
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import zmq.asyncio

from image_server.client import RenderClient, RenderFailed
from schemas import ImageReady, RenderAccepted, RenderError, RenderProgress
from tests.procs import Procs, journal_rows, write_config

pytestmark = pytest.mark.slow

LOOPBACK = {
    "requests": {"kind": "sub", "bind": "tcp://127.0.0.1:0"},
    "events": {"kind": "xpub", "bind": "tcp://127.0.0.1:0"},
}
ISO_MS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


def config(tmp_path: Path, *, mock: dict[str, Any] | None = None, **top: Any) -> Path:
    values: dict[str, Any] = {
        "service_id": "ops-svc",
        "state_dir": tmp_path / "state",
        "output_dir": tmp_path / "output",
        "heartbeat_interval_s": 0.2,
        **top,
    }
    sockets = values.pop("sockets", LOOPBACK)
    return write_config(tmp_path / "config.toml", sockets=sockets, mock=mock or {}, **values)


async def test_health_command_over_http_and_over_zmq(procs: Procs, tmp_path: Path) -> None:
    http = config(tmp_path, http={"enabled": True, "port": 0})
    service = await procs.service("http", http)
    port = service.endpoints["http"].rsplit(":", 1)[1]
    # The health command reads the port from the config: give it the one bound.
    http.write_text(http.read_text().replace("port = 0", f"port = {port}"))
    code, output = await procs.run("health", "--config", str(http))
    assert code == 0, output
    assert json.loads(output)["status"] == "ok"
    service.send_signal(signal.SIGTERM)
    assert await service.wait() == 0
    code, output = await procs.run("health", "--config", str(http), "--timeout", "2")
    assert code == 1 and "not ready" in output

    plain = config(tmp_path)
    zmq_service = await procs.service("zmq", plain)
    binds = zmq_service.endpoints
    plain.write_text(
        plain.read_text()
        .replace('bind = "tcp://127.0.0.1:0"', f'bind = "{binds["requests"]}"', 1)
        .replace('bind = "tcp://127.0.0.1:0"', f'bind = "{binds["events"]}"', 1)
    )
    code, output = await procs.run("health", "--config", str(plain))
    assert code == 0 and output.startswith("ready: ops-svc 0."), output
    zmq_service.send_signal(signal.SIGTERM)
    assert await zmq_service.wait() == 0
    started = time.perf_counter()
    code, output = await procs.run("health", "--config", str(plain), "--timeout", "1")
    assert code == 1 and "no ServiceStatus" in output
    assert time.perf_counter() - started < 10


async def test_json_logs_with_iso_timestamps_to_stderr_and_a_rotated_file(procs: Procs, tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "service.log"
    path = config(tmp_path, log={"format": "json", "file": log_file, "max_bytes": 1024, "backup_count": 2})
    service = await procs.service("json", path)
    async with RenderClient(service.endpoints["requests"], service.endpoints["events"]) as client:
        await client.wait_ready(10)
        for i in range(8):
            await client.render(request_id=f"log-{i}", prompt="x", width=64, height=64)
    service.send_signal(signal.SIGTERM)
    assert await service.wait() == 0
    records = [json.loads(line) for line in service.lines]
    assert all(re.fullmatch(ISO_MS, record["ts"]) for record in records)
    assert all({"ts", "level", "logger", "message"} <= set(record) for record in records)
    done = [r for r in records if r.get("request_id") == "log-3" and "duration_ms" in r]
    assert len(done) == 1 and done[0]["generator"] == "mock" and done[0]["duration_ms"] > 0
    assert records[-2]["message"] == "shutdown summary: 8 completed, 0 failed, 0 left in the journal for the next start"
    # The file got the same lines, rotated at 1 kB, keeping two backups.
    files = sorted(log_file.parent.iterdir())
    assert [f.name for f in files] == ["service.log", "service.log.1", "service.log.2"]
    assert all(f.stat().st_size <= 1024 + 512 for f in files)
    last = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert last[-1]["message"] == "stopped"


async def test_text_logs_carry_the_date_and_the_offset(procs: Procs, tmp_path: Path) -> None:
    service = await procs.service("text", config(tmp_path))
    service.send_signal(signal.SIGTERM)
    assert await service.wait() == 0
    stamp = re.match(rf"({ISO_MS}) INFO ", service.lines[0])
    assert stamp is not None, service.lines[0]
    assert abs(datetime.fromisoformat(stamp.group(1)).timestamp() - time.time()) < 60


class Events:
    def __init__(self) -> None:
        self.seen: list[Any] = []
        self.changed = asyncio.Event()

    def __call__(self, event: Any) -> None:
        self.seen.append(event)
        self.changed.set()

    def of(self, kind: type, request_id: str) -> list[Any]:
        return [e for e in self.seen if isinstance(e, kind) and e.request_id == request_id]

    async def until(self, predicate: Any, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


async def test_first_signal_starts_nothing_queued_and_a_second_stops_at_once(
    procs: Procs, tmp_path: Path, context: zmq.asyncio.Context
) -> None:
    path = config(tmp_path, shutdown_timeout_s=60.0, mock={"delay_s": 30.0, "concurrency": 1})
    service = await procs.service("first", path)
    binds = dict(service.endpoints)
    events = Events()
    async with RenderClient(binds["requests"], binds["events"], context=context, on_event=events) as client:
        await client.wait_ready(10)
        renders = [
            asyncio.create_task(client.render(request_id=rid, prompt=rid, width=64, height=64, timeout=120))
            for rid in ("running", "queued")
        ]
        await events.until(lambda: events.of(RenderAccepted, "running") and events.of(RenderAccepted, "queued"))
        await events.until(lambda: any(e.stage == "started" for e in events.of(RenderProgress, "running")))
        service.send_signal(signal.SIGTERM)
        since = len(service.lines)
        await service.wait_for(r"draining 1 running request\(s\) for up to 60.0s", since=since)
        # The render in flight keeps running; the queued one was not started.
        assert service.running
        assert not any(e.stage == "started" for e in events.of(RenderProgress, "queued"))
        signalled = time.perf_counter()
        service.send_signal(signal.SIGTERM)
        assert await service.wait(10) == 0
        assert time.perf_counter() - signalled < 5
        assert service.matching(r"shutdown summary: 0 completed, 0 failed, 2 left in the journal for the next start")
        assert not events.of(ImageReady, "running") and not events.of(RenderError, "queued")
        rows = journal_rows(tmp_path / "state")
        assert {rid: row["finished_at"] for rid, row in rows.items()} == {"running": None, "queued": None}
        code, output = await procs.run("jobs", "--config", str(path))
        assert code == 0
        assert re.search(r"running\s*│\s*interrupted", output) and re.search(r"queued\s*│\s*interrupted", output)
        for task in renders:
            task.cancel()
        await asyncio.gather(*renders, return_exceptions=True)


async def test_a_full_disk_ends_requests_with_a_retryable_storage_error(procs: Procs, tmp_path: Path) -> None:
    # RLIMIT_FSIZE caps each file the service writes: a 4096x4096 PNG (about 270 kB) cannot be
    # written, small images and the journal can. Python ignores SIGXFSZ, so the write fails
    # with EFBIG, as a full disk fails with ENOSPC.
    limit = 192 * 1024

    def cap_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    path = config(tmp_path, http={"enabled": True, "port": 0}, mock={"style": "detailed"})
    service = await procs.service("capped", path, preexec_fn=cap_file_size)
    async with RenderClient(service.endpoints["requests"], service.endpoints["events"]) as client:
        await client.wait_ready(10)
        small = await client.render(request_id="small", prompt="x", width=64, height=64)
        with pytest.raises(RenderFailed) as big:
            await client.render(request_id="big", prompt="x", width=4096, height=4096, timeout=60)
        again = await client.render(request_id="small-2", prompt="x", width=64, height=64)
    event = big.value.event
    assert event.code == "storage" and event.retryable
    assert event.message == f"output dir {tmp_path / 'output'} not writable: File too large"
    assert Path(small.event.images[0].path or "").is_file() and again.event.images
    assert not service.matching("Traceback")
    assert service.matching(r"! big storage: output dir .* not writable: File too large")
    async with httpx.AsyncClient(base_url=service.endpoints["http"]) as http:
        metrics = (await http.get("/metrics")).text
    assert 'image_server_requests_total{generator="mock",outcome="storage"} 1.0' in metrics


async def test_health_wait_returns_once_a_starting_service_is_ready(procs: Procs, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a free port for the config; the service binds it next
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = config(tmp_path, http={"enabled": True, "port": port})
    waiting = asyncio.create_task(procs.run("health", "--wait", "--timeout", "30", "--config", str(path)))
    code, output = await procs.run("health", "--config", str(path), "--timeout", "1")
    assert code == 1 and "not ready" in output  # nothing listens yet
    await procs.service("late", path)
    code, output = await waiting
    assert code == 0 and json.loads(output)["checks"]["sockets"]["ok"], output
