"""Cancel, channel supersede, clear_queue and long renders across workers.

Each worker has its own NATS connection, as on another machine: what reaches it goes
through JetStream and core NATS, never through this process's memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import pytest

from image_server.client import RenderClient, RenderFailed, RenderResult
from schemas import ImageReady, RenderAccepted, RenderError, RenderProgress
from tests.cluster.conftest import Deployment


class Watch:
    """Events seen by a client, and waits for a request to start rendering."""

    def __init__(self, client: RenderClient) -> None:
        self.accepted: set[str] = set()
        self.started: set[str] = set()
        self.terminal: dict[str, list[Any]] = {}
        self._changed = asyncio.Event()
        client.on_event = self._on_event

    def _on_event(self, event: Any) -> None:
        if isinstance(event, RenderAccepted):
            self.accepted.add(event.request_id)
        if isinstance(event, RenderProgress) and event.stage == "started":
            self.started.add(event.request_id)
        if isinstance(event, ImageReady | RenderError):
            self.terminal.setdefault(event.request_id, []).append(event)
        self._changed.set()

    async def until_started(self, ids: Iterable[str], timeout: float = 15.0) -> None:
        await self._until(self.started, set(ids), timeout)

    async def until_accepted(self, ids: Iterable[str], timeout: float = 15.0) -> None:
        await self._until(self.accepted, set(ids), timeout)

    async def _until(self, seen: set[str], wanted: set[str], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not wanted <= seen:
                self._changed.clear()
                await self._changed.wait()


def render(client: RenderClient, rid: str, *, delay_s: float, **fields: Any) -> asyncio.Task[RenderResult]:
    return asyncio.ensure_future(
        client.render(
            request_id=rid, prompt=rid, width=64, height=64, generator_config={"delay_s": delay_s}, timeout=30, **fields
        )
    )


async def outcome(task: asyncio.Task[RenderResult]) -> str:
    try:
        await task
    except RenderFailed as exc:
        return exc.code
    return "ready"


async def test_cancel_reaches_a_request_running_on_another_worker(deployment: Deployment) -> None:
    gateway = await deployment.gateway()
    workers = [await deployment.worker("w1"), await deployment.worker("w2")]
    client = await deployment.client(gateway)
    watch = Watch(client)
    task = render(client, "long", delay_s=20)
    await watch.until_started(["long"])
    assert any("long" in worker.jobs.running for worker in workers)
    await client.cancel("long")
    async with asyncio.timeout(10):
        assert await outcome(task) == "cancelled"
    assert len(watch.terminal["long"]) == 1


async def test_cancel_reaches_a_request_still_in_the_queue(deployment: Deployment) -> None:
    gateway = await deployment.gateway()
    await deployment.worker("w1", cluster={"worker_concurrency": 1})
    client = await deployment.client(gateway)
    watch = Watch(client)
    first = render(client, "first", delay_s=1)
    await watch.until_started(["first"])
    queued = render(client, "queued", delay_s=0)
    await watch.until_accepted(["queued"])
    await client.cancel("queued")
    assert await outcome(queued) == "cancelled"
    assert await outcome(first) == "ready"


async def test_a_newer_request_on_a_channel_supersedes_older_ones_on_any_worker(deployment: Deployment) -> None:
    gateway = await deployment.gateway()
    for name in ("w1", "w2"):
        await deployment.worker(name, cluster={"worker_concurrency": 1})
    client = await deployment.client(gateway)
    watch = Watch(client)
    running = render(client, "a", delay_s=20, channel="wall")
    await watch.until_started(["a"])
    newer = render(client, "b", delay_s=0, channel="wall")
    assert await outcome(running) == "superseded"
    assert await outcome(newer) == "ready"
    (ended,) = watch.terminal["a"]
    assert "superseded by b on channel wall" in ended.message


async def test_clear_queue_ends_what_waits_in_the_stream_and_spares_what_runs(deployment: Deployment) -> None:
    gateway = await deployment.gateway()
    for name in ("w1", "w2"):
        await deployment.worker(name, cluster={"worker_concurrency": 1})
    client = await deployment.client(gateway)
    watch = Watch(client)
    running = [render(client, rid, delay_s=1.5) for rid in ("r1", "r2")]
    await watch.until_started(["r1", "r2"])  # one on each worker: both busy
    waiting = [render(client, rid, delay_s=0) for rid in ("q1", "q2")]
    await watch.until_accepted(["q1", "q2"])
    clearing = render(client, "clear", delay_s=0, clear_queue=True)
    assert [await outcome(task) for task in waiting] == ["superseded", "superseded"]
    assert [await outcome(task) for task in running] == ["ready", "ready"]
    assert await outcome(clearing) == "ready"


@pytest.mark.slow
async def test_a_render_longer_than_the_ack_wait_stays_with_its_worker(deployment: Deployment) -> None:
    gateway = await deployment.gateway()
    slow_ack = {"ack_wait_s": 0.6}
    workers = [await deployment.worker(name, cluster=slow_ack) for name in ("w1", "w2")]
    client = await deployment.client(gateway)
    result = await render(client, "slow", delay_s=2.5)
    assert result.event.images
    counters = [worker.counters for worker in workers]
    assert sum(c["completed"] for c in counters) == 1
    assert sum(c["already_finished"] + c["lost_race"] for c in counters) == 0  # never delivered twice


async def test_higher_priority_bands_are_pulled_first(deployment: Deployment) -> None:
    gateway = await deployment.gateway()
    await deployment.worker("w1", cluster={"worker_concurrency": 1})
    client = await deployment.client(gateway)
    order: list[str] = []
    watch = Watch(client)
    watch_event = client.on_event

    def record(event: Any) -> None:
        if isinstance(event, RenderProgress) and event.stage == "started":
            order.append(event.request_id)
        assert watch_event is not None
        watch_event(event)

    client.on_event = record
    busy = render(client, "busy", delay_s=1.0)
    await watch.until_started(["busy"])
    waiting = [
        render(client, rid, delay_s=0, priority=priority) for rid, priority in (("low", -5), ("normal", 0), ("high", 5))
    ]
    await watch.until_accepted(["low", "normal", "high"])
    assert [await outcome(task) for task in [busy, *waiting]] == ["ready"] * 4
    assert order == ["busy", "high", "normal", "low"]


async def test_a_cancel_from_another_client_reaches_nothing(deployment: Deployment) -> None:
    gateway = await deployment.gateway()
    await deployment.worker("w1")
    owner = await deployment.client(gateway)
    stranger = await deployment.client(gateway)
    watch = Watch(owner)
    task = render(owner, "mine", delay_s=1.0)
    await watch.until_started(["mine"])
    await stranger.cancel("mine")  # scoped to its sender (reply_to here), as in one process
    assert await outcome(task) == "ready"
