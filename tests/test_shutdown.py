"""Graceful shutdown of a service subprocess: SIGTERM drains, then leaves the rest.

SIGTERM stops intake and waits up to ``shutdown_timeout_s`` for the renders in flight.
What finishes in time is delivered before the process exits; what does not stays in the
journal with no terminal event (none is invented) and is resumed by the next start.
``image-server jobs`` shows both states from the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio

from image_server.client import RenderClient, RenderResult
from schemas import ImageReady, RenderAccepted, RenderError
from tests.procs import Procs, journal_rows, write_config

pytestmark = pytest.mark.slow


class Watcher:
    """Records which requests were accepted and which got a terminal event on the wire."""

    def __init__(self) -> None:
        self.accepted: set[str] = set()
        self.terminal: set[str] = set()
        self.changed = asyncio.Event()

    def __call__(self, event: Any) -> None:
        if isinstance(event, RenderAccepted):
            self.accepted.add(event.request_id)
        elif isinstance(event, ImageReady | RenderError):
            self.terminal.add(event.request_id)
        self.changed.set()

    async def all_accepted(self, ids: list[str], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not self.accepted >= set(ids):
                self.changed.clear()
                await self.changed.wait()


def service_config(tmp_path: Path, *, delay_s: float, shutdown_timeout_s: float) -> Path:
    return write_config(
        tmp_path / "config.toml",
        service_id="drain-svc",
        state_dir=tmp_path / "state",
        output_dir=tmp_path / "output",
        heartbeat_interval_s=0.2,
        shutdown_timeout_s=shutdown_timeout_s,
        sockets={
            "requests": {"kind": "sub", "bind": "tcp://127.0.0.1:0"},
            "events": {"kind": "xpub", "bind": "tcp://127.0.0.1:0"},
        },
        mock={"delay_s": delay_s, "concurrency": 8},
    )


async def jobs_statuses(procs: Procs, config: Path) -> dict[str, str]:
    """``image-server jobs`` as {request_id: status}, read from its table's rows."""
    code, output = await procs.run("--config", str(config), "jobs")
    assert code == 0, output
    header = next(line for line in output.splitlines() if "request_id" in line)
    columns = [cell.strip() for cell in re.split(r"[┃│]", header)]
    statuses = {}
    for line in output.splitlines():
        row = dict(zip(columns, (cell.strip() for cell in line.split("│")), strict=False))
        if row.get("request_id", "").startswith("drain-"):
            assert row["generator"] == "mock", line
            assert bool(row["total ms"]) == (row["status"] == "done"), line  # timings once finished
            statuses[row["request_id"]] = row["status"]
    return statuses


async def test_sigterm_leaves_unfinished_work_for_the_next_start(
    procs: Procs, tmp_path: Path, context: zmq.asyncio.Context
) -> None:
    delay_s = 3.0
    config = service_config(tmp_path, delay_s=delay_s, shutdown_timeout_s=0.3)
    service = await procs.service("first", config)
    binds = dict(service.endpoints)
    ids = [f"drain-{i}" for i in range(5)]
    watcher = Watcher()

    async def render(client: RenderClient, request_id: str) -> RenderResult:
        return await client.render(request_id=request_id, prompt=request_id, width=64, height=64, timeout=30)

    async with RenderClient(binds["requests"], binds["events"], context=context, on_event=watcher) as client:
        await client.wait_ready(10)
        renders = asyncio.gather(*(render(client, rid) for rid in ids))
        await watcher.all_accepted(ids)
        signalled = time.perf_counter()
        service.send_signal(signal.SIGTERM)
        assert await service.wait(10) == 0
        exited_after = time.perf_counter() - signalled
        # It stopped at the drain deadline instead of waiting the renders out...
        assert exited_after < delay_s - 0.5, exited_after
        assert service.matching(r"shutdown summary: 0 completed, 0 failed, 5 left in the journal for the next start")
        # ...and invented no terminal event: none published, none journaled.
        assert not watcher.terminal and not renders.done()
        rows = journal_rows(tmp_path / "state")
        assert set(rows) == set(ids)
        assert all(row["finished_at"] is None and row["terminal"] is None for row in rows.values())
        assert await jobs_statuses(procs, config) == dict.fromkeys(ids, "interrupted")

        # The next start resumes all of them; the waiting client gets every result.
        restarted = await procs.service("second", config, binds=binds)
        async with asyncio.timeout(20):
            results = await renders
    assert {m.group(1) for m in restarted.matching(r"↻ (\S+) resumed")} == set(ids)
    assert [r.event.request_id for r in results] == ids
    assert {r.event.service_id for r in results} == {"drain-svc"}
    restarted.send_signal(signal.SIGTERM)
    assert await restarted.wait(10) == 0
    rows = journal_rows(tmp_path / "state")
    assert all(row["outcome"] == "ImageReady" for row in rows.values())
    assert await jobs_statuses(procs, config) == dict.fromkeys(ids, "done")


async def test_sigterm_delivers_work_that_finishes_within_the_deadline(
    procs: Procs, tmp_path: Path, context: zmq.asyncio.Context
) -> None:
    config = service_config(tmp_path, delay_s=0.5, shutdown_timeout_s=10.0)
    service = await procs.service("only", config)
    ids = [f"drain-{i}" for i in range(5)]
    watcher = Watcher()
    endpoints = service.endpoints
    async with RenderClient(endpoints["requests"], endpoints["events"], context=context, on_event=watcher) as client:
        await client.wait_ready(10)
        renders = asyncio.gather(
            *(client.render(request_id=rid, prompt=rid, width=64, height=64, timeout=30) for rid in ids)
        )
        await watcher.all_accepted(ids)
        service.send_signal(signal.SIGTERM)
        await service.wait_for(r"draining 5 running request\(s\)", timeout=10)
        # Intake has stopped: a request sent now is not taken on by this process.
        late = asyncio.create_task(client.render(request_id="drain-late", prompt="late", width=64, timeout=30))
        async with asyncio.timeout(10):
            results = await renders
        assert await service.wait(10) == 0
        late.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await late
    assert [r.event.request_id for r in results] == ids
    assert "drain-late" not in watcher.accepted
    assert service.matching(r"shutdown summary: 5 completed, 0 failed, 0 left in the journal")
    rows = journal_rows(tmp_path / "state")
    assert set(rows) == set(ids)
    assert all(row["outcome"] == "ImageReady" for row in rows.values())
    assert await jobs_statuses(procs, config) == dict.fromkeys(ids, "done")
