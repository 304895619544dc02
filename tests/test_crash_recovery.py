"""Crash test: SIGKILL the service three times under load; every request ends exactly once.

The service runs as a real subprocess (``python -m image_server serve``) with a real
journal. A RenderClient sends 1,000 requests at once; after about 250, 500 and 750 of them
have returned, the service is killed with SIGKILL (no shutdown code runs) and started again
on the same ports with the same state directory. The journal resumes what was accepted,
the client re-sends what may have been lost, and de-duplicates what arrives twice.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio

from image_server.client import RenderClient, RenderResult
from schemas import ImageReady, RenderError
from tests.procs import Procs, journal_rows, write_config

pytestmark = pytest.mark.slow

REQUESTS = 1000
KILL_AFTER = (250, 500, 750)


async def test_sigkill_three_times_every_request_ends_exactly_once(
    procs: Procs, tmp_path: Path, context: zmq.asyncio.Context
) -> None:
    state_dir = tmp_path / "state"
    config = write_config(
        tmp_path / "config.toml",
        service_id="crash-svc",
        state_dir=state_dir,
        output_dir=tmp_path / "output",
        heartbeat_interval_s=0.2,
        shutdown_timeout_s=2.0,
        sockets={
            "requests": {"kind": "sub", "bind": "tcp://127.0.0.1:0", "high_water_mark": 0},
            "events": {"kind": "xpub", "bind": "tcp://127.0.0.1:0", "high_water_mark": 0},
        },
        limits={"max_in_flight": 64, "max_queued": 2 * REQUESTS},
        mock={"delay_s": 0.05, "concurrency": 64},
    )
    service = await procs.service("service-0", config)
    binds = dict(service.endpoints)  # every restart binds the same ports, so the client reconnects

    wire_terminals: Counter[str] = Counter()  # terminal events as they arrive, duplicates included

    def on_event(event: Any) -> None:
        if isinstance(event, ImageReady | RenderError):
            wire_terminals[event.request_id] += 1

    returned: list[str] = []
    progress = asyncio.Condition()

    async def render(client: RenderClient, request_id: str) -> RenderResult:
        result = await client.render(request_id=request_id, prompt=f"frame {request_id}", width=64, height=64)
        async with progress:
            returned.append(result.event.request_id)
            progress.notify_all()
        return result

    async def kill_and_restart(number: int, after: int) -> None:
        nonlocal service
        async with progress:
            await progress.wait_for(lambda: len(returned) >= after)
        assert await service.kill() == -9
        service = await procs.service(f"service-{number}", config, binds=binds)
        assert service.endpoints == binds

    started = time.perf_counter()
    async with RenderClient(binds["requests"], binds["events"], context=context, on_event=on_event) as client:
        await client.wait_ready(10)
        ids = [f"crash-{i:04d}" for i in range(REQUESTS)]
        async with asyncio.timeout(90):
            renders = asyncio.gather(*(render(client, rid) for rid in ids))
            for number, after in enumerate(KILL_AFTER, start=1):
                await kill_and_restart(number, after)
            results = await renders
        duplicates = client.duplicates
    elapsed = time.perf_counter() - started

    # Recovery came from noticing the restarts, not from the slow periodic nudge: a terminal
    # event published before the client had re-subscribed would otherwise wait for it.
    assert elapsed < client.nudge_interval_s, elapsed
    # Exactly once at the caller: every render() returned its own request, none twice.
    assert [r.event.request_id for r in results] == ids
    assert sorted(returned) == ids
    assert all(isinstance(r.event, ImageReady) and r.event.images for r in results)
    # Terminal events that arrived more than once on the wire were absorbed by the client.
    assert set(wire_terminals) == set(ids)
    assert sum(wire_terminals.values()) == REQUESTS + duplicates

    # Each kill happened with accepted work in flight, which the next start resumed.
    assert service.running
    resumed_per_start = [
        {m.group(1) for m in proc.matching(r"↻ (\S+) resumed")} for proc in procs.started[1 : len(KILL_AFTER) + 1]
    ]
    assert all(resumed_per_start), [len(r) for r in resumed_per_start]
    assert set().union(*resumed_per_start) <= set(ids)

    service.send_signal(signal.SIGTERM)
    assert await service.wait() == 0
    rows = journal_rows(state_dir)
    assert set(rows) == set(ids)
    assert all(row["finished_at"] is not None and row["outcome"] == "ImageReady" for row in rows.values())
    print(
        f"\n{REQUESTS} requests, {len(KILL_AFTER)} SIGKILLs in {elapsed:.1f}s; resumed per restart "
        f"{[len(r) for r in resumed_per_start]}; client resends {client.resends}, duplicates {duplicates}"
    )
