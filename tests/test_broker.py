"""Scale-out: three worker processes behind ``image-server broker``; one is killed mid-run.

The broker and the workers are real subprocesses. Workers PULL requests from the broker
and connect their XPUB event sockets to its XSUB; the client knows only the broker's two
client endpoints. When a worker dies, the requests it had accepted are re-sent by the
client once that worker's Heartbeats stop, and the broker hands them to a live worker.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio

from image_server.client import RenderClient, RenderResult
from schemas import ImageReady, RenderAccepted, RenderError
from tests.procs import Procs, running_procs, wait_for_heartbeats, write_config

pytestmark = pytest.mark.slow

REQUESTS = 300
WORKERS = ("worker-1", "worker-2", "worker-3")
VICTIM = "worker-2"


@pytest.fixture
async def procs(tmp_path: Path) -> AsyncIterator[Procs]:
    async with running_procs(tmp_path) as started:
        yield started


async def test_three_workers_behind_the_broker_survive_losing_one(
    procs: Procs, tmp_path: Path, context: zmq.asyncio.Context
) -> None:
    broker, endpoints = await procs.broker()
    workers = {}
    for service_id in WORKERS:
        config = write_config(
            tmp_path / f"{service_id}.toml",
            service_id=service_id,
            state_dir=tmp_path / service_id / "state",
            output_dir=tmp_path / service_id / "output",
            heartbeat_interval_s=0.2,
            sockets={
                "requests": {"kind": "pull", "connect": [endpoints["workers_requests"]]},
                "events": {"kind": "xpub", "connect": [endpoints["workers_events"]]},
            },
            mock={"delay_s": 0.1, "concurrency": 8},
        )
        workers[service_id] = await procs.service(service_id, config)
    await wait_for_heartbeats(context, endpoints["clients_events"], WORKERS)

    accepted_by: dict[str, list[str]] = {}  # request id -> service ids that accepted it, in order
    finished_on_wire: set[str] = set()

    def on_event(event: Any) -> None:
        if isinstance(event, RenderAccepted):
            accepted_by.setdefault(event.request_id, []).append(event.service_id)
        elif isinstance(event, ImageReady | RenderError):
            finished_on_wire.add(event.request_id)

    returned: list[RenderResult] = []
    progress = asyncio.Condition()

    async def render(client: RenderClient, request_id: str) -> RenderResult:
        result = await client.render(request_id=request_id, prompt=request_id, width=64, height=64)
        async with progress:
            returned.append(result)
            progress.notify_all()
        return result

    def orphans() -> set[str]:
        """Requests the victim accepted (last) that have no terminal event yet."""
        return {rid for rid, ids in accepted_by.items() if ids[-1] == VICTIM and rid not in finished_on_wire}

    async with RenderClient(
        endpoints["clients_requests"], endpoints["clients_events"], context=context, on_event=on_event
    ) as client:
        # Each worker's PULL socket is connected once it has answered a StatusRequest
        # (the broker's PUSH deals them round robin to connected workers only).
        answered: set[str] = set()
        async with asyncio.timeout(20):
            while answered != set(WORKERS):
                answered.add((await client.status()).service_id)

        ids = [f"broker-{i:03d}" for i in range(REQUESTS)]
        async with asyncio.timeout(60):
            renders = asyncio.gather(*(render(client, rid) for rid in ids))
            async with progress:
                await progress.wait_for(lambda: len(returned) >= REQUESTS // 3 and len(orphans()) >= 3)
            orphaned = orphans()
            assert await workers[VICTIM].kill() == -9
            results = await renders

    assert sorted(r.event.request_id for r in results) == ids
    assert all(isinstance(r.event, ImageReady) for r in results)
    produced_by = Counter(r.event.service_id for r in results)
    assert set(produced_by) == set(WORKERS), produced_by  # every worker took work
    # What the victim held when it died was finished by the survivors after a re-send.
    rescued = {r.event.request_id: r.event.service_id for r in results if r.event.request_id in orphaned}
    assert any(service_id != VICTIM for service_id in rescued.values()), rescued
    for request_id, service_id in rescued.items():
        assert service_id in accepted_by[request_id]  # the survivor accepted it before rendering it

    for service_id in set(WORKERS) - {VICTIM}:
        workers[service_id].send_signal(signal.SIGTERM)
        assert await workers[service_id].wait() == 0
    broker.send_signal(signal.SIGTERM)
    assert await broker.wait() == 0
    print(f"\nproduced by {dict(produced_by)}; {len(orphaned)} orphaned by the kill; resends {client.resends}")
