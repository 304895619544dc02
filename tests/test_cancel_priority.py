"""Cancel (queued and running), supersede on a channel, clear_queue, priorities under
saturation and progress events, seen by a catch-all subscriber on real sockets.

Every test counts terminal events per request id: nothing may end without exactly one.
``EventLog`` and ``Script`` are shared with the other resilience test modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from image_server.generators.base import GeneratorConfig, RenderJob
from image_server.generators.mock import MockGenerator
from image_server.scheduler import Scheduler
from schemas import (
    CancelRequest,
    ImageReady,
    RenderAccepted,
    RenderError,
    RenderProgress,
    RenderRequest,
    ServiceStatus,
    StatusRequest,
    decode_frames,
    encode_message,
)
from tests.waiting import until

TERMINAL = (ImageReady, RenderError)


class EventLog:
    """Everything a raw peer's catch-all SUB receives, in order, with waits on conditions."""

    def __init__(self, peer: Any) -> None:
        self.peer = peer
        self.events: list[Any] = []
        self.blobs: list[list[bytes]] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EventLog:
        self._task = asyncio.create_task(self._read(), name="event-log")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _read(self) -> None:
        while True:
            decoded = decode_frames(await self.peer.sub.recv_multipart())
            async with self._changed:
                self.events.append(decoded.message)
                self.blobs.append(list(decoded.blobs))
                self._changed.notify_all()

    async def send(self, message: Any) -> None:
        await self.peer.send(encode_message(message))

    async def render(self, request_id: str, prompt: str = "p", **fields: Any) -> None:
        await self.send(RenderRequest(request_id=request_id, prompt=prompt, width=64, height=64, **fields))

    def find(self, predicate: Callable[[Any], bool]) -> Any | None:
        return next((event for event in self.events if predicate(event)), None)

    async def wait_for(self, predicate: Callable[[Any], bool], timeout: float = 5.0) -> Any:
        """The first event (already seen or still to come) matching ``predicate``."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.find(predicate) is not None)
        return self.find(predicate)

    async def terminal(self, request_id: str, timeout: float = 5.0) -> ImageReady | RenderError:
        event: ImageReady | RenderError = await self.wait_for(
            lambda m: isinstance(m, TERMINAL) and m.request_id == request_id, timeout
        )
        return event

    async def flush(self) -> None:
        """Wait until everything the service published so far has arrived: one PUB socket
        keeps order, so the answer to a fresh StatusRequest comes after all of it."""
        probe = f"flush-{uuid.uuid4().hex[:8]}"
        await self.send(StatusRequest(request_id=probe))
        await self.wait_for(lambda m: isinstance(m, ServiceStatus) and m.request_id == probe)

    def of(self, request_id: str, kind: type | tuple[type, ...] = object) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and getattr(e, "request_id", None) == request_id]

    def terminal_counts(self) -> Counter[str]:
        return Counter(event.request_id for event in self.events if isinstance(event, TERMINAL))


class Script:
    """A MockGenerator handler: records the start order, holds a request whose prompt is
    "hold" until ``release`` is set, and records when the service cancels its work."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.release = asyncio.Event()

    async def __call__(self, job: RenderJob) -> None:
        rid = job.request.request_id
        self.started.append(rid)
        if job.request.prompt == "hold":
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.append(rid)
                raise

    def factory(self, name: str, config: GeneratorConfig) -> MockGenerator:
        return MockGenerator(config, name=name, handler=self)


def saturated(**overrides: Any) -> dict[str, Any]:
    """Service overrides: one render at a time, so later requests queue."""
    return {"limits": {"max_in_flight": 1}, **overrides}


async def test_cancel_while_queued_and_while_running(service_factory, raw_peer):
    script = Script()
    async with service_factory(factory=script.factory, **saturated()) as service:
        async with EventLog(await raw_peer(service)) as log:
            await log.render("running", "hold")
            await until(lambda: script.started == ["running"])
            await log.render("waiting")
            await until(lambda: service.manager.scheduler.position("waiting") == 1)

            await log.send(CancelRequest(request_id="waiting"))
            queued_end = await log.terminal("waiting")
            assert isinstance(queued_end, RenderError) and queued_end.code == "cancelled"
            assert script.started == ["running"]  # it never reached the generator

            await log.send(CancelRequest(request_id="running"))
            running_end = await log.terminal("running")
            assert isinstance(running_end, RenderError) and running_end.code == "cancelled"
            assert not running_end.retryable
            assert script.cancelled == ["running"]  # the generator saw its work cancelled

            # A cancel for a finished request changes nothing; the slot is free again.
            await log.send(CancelRequest(request_id="running"))
            await log.render("after")
            assert isinstance(await log.terminal("after"), ImageReady)
            await log.flush()
    assert log.terminal_counts() == {"running": 1, "waiting": 1, "after": 1}
    assert [e.request_id for e in log.events if isinstance(e, RenderAccepted)] == ["running", "waiting", "after"]
    assert service.counters["failed"] == 2 and service.counters["completed"] == 1


async def test_cancel_arriving_with_its_request_still_ends_it_once(service_factory, raw_peer):
    """A CancelRequest right behind its RenderRequest may be handled before the request's
    task has run at all; the request must still end with one terminal event."""
    script = Script()
    async with service_factory(factory=script.factory) as service:
        async with EventLog(await raw_peer(service)) as log:
            for index in range(5):
                rid = f"quick-{index}"
                await log.render(rid, "hold")
                await log.send(CancelRequest(request_id=rid))
            for index in range(5):
                end = await log.terminal(f"quick-{index}")
                assert isinstance(end, RenderError) and end.code == "cancelled", end
            await until(lambda: not service.active)
            # The id is free for a new render (a stale in-flight entry would swallow it).
            await log.render("quick-0-again")
            assert isinstance(await log.terminal("quick-0-again"), ImageReady)
            await log.flush()
    assert all(count == 1 for count in log.terminal_counts().values())
    assert len(log.terminal_counts()) == 6


async def test_channel_supersedes_running_and_queued_requests(service_factory, raw_peer):
    script = Script()
    async with service_factory(factory=script.factory, **saturated()) as service:
        async with EventLog(await raw_peer(service)) as log:
            # Running: the newer request on the wall supersedes the one being rendered.
            await log.render("wall-1", "hold", channel="wall")
            await until(lambda: script.started == ["wall-1"])
            await log.render("wall-2", channel="wall")
            first = await log.terminal("wall-1")
            assert isinstance(first, RenderError) and first.code == "superseded"
            assert "wall-2" in first.message and script.cancelled == ["wall-1"]
            assert isinstance(await log.terminal("wall-2"), ImageReady)

            # Queued: a render on another channel holds the only slot.
            await log.render("other-1", "hold", channel="other")
            await until(lambda: script.started[-1] == "other-1")
            await log.render("wall-3", channel="wall")
            await until(lambda: service.manager.scheduler.position("wall-3") == 1)
            await log.render("wall-4", channel="wall")
            third = await log.terminal("wall-3")
            assert isinstance(third, RenderError) and third.code == "superseded"
            script.release.set()
            assert isinstance(await log.terminal("other-1"), ImageReady)
            assert isinstance(await log.terminal("wall-4"), ImageReady)
            await log.flush()
    assert script.started == ["wall-1", "wall-2", "other-1", "wall-4"]
    assert log.terminal_counts() == {rid: 1 for rid in ("wall-1", "wall-2", "other-1", "wall-3", "wall-4")}


async def test_clear_queue_ends_pending_but_not_running_requests(service_factory, raw_peer):
    script = Script()
    async with service_factory(factory=script.factory, **saturated()) as service:
        async with EventLog(await raw_peer(service)) as log:
            await log.render("busy", "hold")
            await until(lambda: script.started == ["busy"])
            for index in range(3):
                await log.render(f"pending-{index}", priority=index)
            await until(lambda: service.manager.scheduler.queued == 3)
            await log.render("fresh", clear_queue=True)
            for index in range(3):
                end = await log.terminal(f"pending-{index}")
                assert isinstance(end, RenderError) and end.code == "superseded", end
            assert service.manager.scheduler.in_flight == 1 and "busy" in service.active
            script.release.set()
            assert isinstance(await log.terminal("busy"), ImageReady)
            assert isinstance(await log.terminal("fresh"), ImageReady)
            await log.flush()
    assert script.started == ["busy", "fresh"] and script.cancelled == []
    assert set(log.terminal_counts().values()) == {1} and len(log.terminal_counts()) == 5


async def test_priorities_under_saturation_then_first_in_first_out(service_factory, raw_peer):
    script = Script()
    async with service_factory(factory=script.factory, **saturated()) as service:
        async with EventLog(await raw_peer(service)) as log:
            await log.render("blocker", "hold")
            await until(lambda: script.started == ["blocker"])
            queued = [("a", 0), ("b", 5), ("c", 0), ("d", 1), ("e", 5), ("f", -3), ("g", 1)]
            for rid, priority in queued:
                await log.render(rid, priority=priority)
            await until(lambda: service.manager.scheduler.queued == len(queued))
            script.release.set()
            for rid, _ in queued:
                assert isinstance(await log.terminal(rid), ImageReady)
            await log.flush()
    assert script.started == ["blocker", "b", "e", "d", "g", "a", "c", "f"]
    assert set(log.terminal_counts().values()) == {1}


async def test_progress_events_queued_started_generating_storing(service_factory, raw_peer):
    calls = 200

    async def chatty(job: RenderJob) -> None:
        await script(job)
        if job.request.prompt == "chatty":
            for step in range(1, calls + 1):
                job.progress(step / calls, f"step {step}")
                if step % 20 == 0:
                    await asyncio.sleep(0.04)  # a provider reporting steadily for ~0.4 s

    script = Script()

    def factory(name: str, config: GeneratorConfig) -> MockGenerator:
        return MockGenerator(config, name=name, handler=chatty)

    async with service_factory(factory=factory, **saturated()) as service:
        async with EventLog(await raw_peer(service)) as log:
            await log.render("first", "hold")
            await until(lambda: script.started == ["first"])
            await log.render("second", "chatty")
            queued = await log.wait_for(
                lambda m: isinstance(m, RenderProgress) and m.request_id == "second" and m.stage == "queued"
            )
            assert queued.queue_position == 1 and queued.generator == "mock"
            script.release.set()
            assert isinstance(await log.terminal("second"), ImageReady)
            await log.flush()

    stages = [(e.stage, e.progress) for e in log.of("second", RenderProgress)]
    names = [stage for stage, _ in stages]
    assert names[0] == "queued" and names[1] == "started" and names[-1] == "storing", names
    generating = [fraction for stage, fraction in stages if stage == "generating"]
    # Throttled to ten a second: ~0.4 s of reports gives a handful, not 200.
    assert 2 <= len(generating) <= calls // 10, generating
    reported = [fraction for fraction in generating if fraction is not None]
    assert reported == sorted(reported) and len(set(reported)) == len(reported)
    order = [type(e).__name__ for e in log.events if getattr(e, "request_id", None) == "second"]
    assert order[0] == "RenderAccepted" and order[-1] == "ImageReady"
    # A request that found a free slot is not reported as queued.
    assert [e.stage for e in log.of("first", RenderProgress)][0] == "started"


async def test_nothing_disappears_under_mixed_cancels_and_supersedes(service_factory, raw_peer):
    """Forty requests over three channels, random cancels and a clear_queue in the middle:
    every request ends with exactly one terminal event and nothing is left behind."""
    rng = random.Random(1234)
    generators = {"mock": {"strategy": "mock", "delay_s": 0.01}}
    async with service_factory(generators=generators, limits={"max_in_flight": 2}) as service:
        async with EventLog(await raw_peer(service)) as log:
            sent: list[str] = []
            for index in range(40):
                rid = f"mix-{index}"
                channel = rng.choice([None, "one", "two", "three"])
                await log.render(rid, channel=channel, priority=rng.randint(-2, 2), clear_queue=index == 25)
                sent.append(rid)
                if rng.random() < 0.3:
                    await log.send(CancelRequest(request_id=rng.choice(sent)))
            for rid in sent:
                await log.terminal(rid, timeout=10)
            await until(lambda: not service.active and service.manager.scheduler.in_flight == 0)
            await log.flush()
    counts = log.terminal_counts()
    assert counts == {rid: 1 for rid in sent}
    codes = Counter(e.code if isinstance(e, RenderError) else "ready" for e in log.events if isinstance(e, TERMINAL))
    assert set(codes) <= {"ready", "cancelled", "superseded"} and codes["ready"] > 0


async def test_scheduler_skips_a_cancelled_waiter_that_has_not_run_yet():
    """A waiter cancelled in the same step as a slot is released must not be granted it:
    that raised InvalidStateError in the releasing task and leaked the slot."""
    scheduler = Scheduler(max_in_flight=1)
    held = scheduler.slot("k", 1)
    await held.__aenter__()
    waiter = asyncio.create_task(scheduler.slot("k", 1).__aenter__())
    await until(lambda: scheduler.queued == 1)
    waiter.cancel()  # its ticket's future is cancelled; the task has not run to leave the queue
    await held.__aexit__(None, None, None)  # releases (and dispatches) before the waiter runs
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    assert waiter.cancelled() and scheduler.in_flight == 0 and scheduler.queued == 0
    async with asyncio.timeout(1), scheduler.slot("k", 1):
        assert scheduler.in_flight == 1
