"""The Outbox alone: a real journal and a real PUB socket, a catch-all SUB listening."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import zmq
import zmq.asyncio

from image_server.identity import Ticket
from image_server.journal import Journal, Recording
from image_server.outbox import Outbox
from image_server.publisher import EventPublisher
from schemas import ImageReady, RenderAccepted, RenderError, RequestConflict, decode_frames


@dataclass
class Wired:
    outbox: Outbox
    journal: Journal
    sub: zmq.asyncio.Socket

    async def received(self, count: int) -> list[object]:
        async with asyncio.timeout(5):
            return [decode_frames(await self.sub.recv_multipart()).message for _ in range(count)]

    async def nothing_more(self) -> bool:
        return not await self.sub.poll(200)


@pytest.fixture
async def wired(tmp_path, context) -> AsyncIterator[Wired]:
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{port}")
    publisher = EventPublisher(pub, service_id="unit")
    async with Journal(tmp_path / "state") as journal:
        # Probe until the subscription has joined (slow joiner), then start clean.
        async with asyncio.timeout(5):
            while not await sub.poll(20):
                publisher.publish_nowait(RequestConflict(request_id="probe", message="probe"))
        while await sub.poll(50):
            await sub.recv_multipart()
        yield Wired(Outbox(publisher, journal, Counter()), journal, sub)
    pub.close(0)
    sub.close(0)


def ready(rid: str) -> ImageReady:
    return ImageReady(request_id=rid, generator="mock", images=[])


async def test_finish_journals_then_sends_exactly_once(wired):
    ticket = Ticket("r-1", "reply_to:alice", "alice")
    assert wired.outbox.hold(ticket)
    await wired.outbox.record(ticket, "mock", b'{"request_id": "r-1", "prompt": "p"}', [])
    await wired.outbox.accepted(ticket, "mock", 0)
    assert await wired.outbox.finish(ticket, ready("r-1"))
    assert not await wired.outbox.finish(ticket, RenderError(request_id="r-1", code="internal", message="again"))
    accepted, done = await wired.received(2)
    assert isinstance(accepted, RenderAccepted) and isinstance(done, ImageReady)
    assert await wired.nothing_more()
    stored = await wired.journal.lookup("r-1")
    assert stored is not None and stored.state is Recording.FINISHED and stored.entry.outcome == "ImageReady"
    assert stored.entry.terminal is not None and b'"seq"' in bytes(stored.entry.terminal)
    assert stored.entry.request_json == b""  # the body goes once the request has succeeded
    assert wired.outbox.counters["terminal_withheld"] == 1


async def test_only_the_ticket_holding_the_id_may_emit(wired):
    holder, impostor = Ticket("r-2", "reply_to:alice", "alice"), Ticket("r-2", "reply_to:mallory", "alice")
    assert wired.outbox.hold(holder) and not wired.outbox.hold(impostor)
    await wired.outbox.accepted(impostor, "mock", 0)
    assert not await wired.outbox.finish(impostor, RenderError(request_id="r-2", code="cancelled", message="x"))
    assert await wired.nothing_more()
    assert await wired.outbox.finish(holder, ready("r-2"))
    assert [type(m) for m in await wired.received(1)] == [ImageReady]


async def test_a_refusal_naming_a_held_or_finished_id_is_a_conflict_not_a_terminal_event(wired):
    held = Ticket("r-3", "reply_to:alice", "alice")
    wired.outbox.hold(held)
    await wired.outbox.refuse(
        Ticket("r-3", "reply_to:alice", "alice"), RenderError(request_id="r-3", code="invalid_request", message="x")
    )
    await wired.outbox.finish(held, ready("r-3"))
    await wired.outbox.refuse(
        Ticket("r-3", "", None), RenderError(request_id="r-3", code="invalid_request", message="x")
    )
    events = await wired.received(3)
    assert [type(m) for m in events] == [RequestConflict, ImageReady, RequestConflict]
    assert wired.outbox.counters["conflicts"] == 2


async def test_a_refusal_of_a_new_id_is_journaled_as_its_one_terminal_event(wired):
    ticket = Ticket("r-4", "reply_to:bob", "bob")
    await wired.outbox.refuse(ticket, RenderError(request_id="r-4", code="overloaded", message="full", retryable=True))
    stored = await wired.journal.lookup("r-4")
    assert stored is not None and stored.entry.code == "overloaded" and stored.entry.owner == "reply_to:bob"
    # The same id admitted later is the same request: its stored event answers, nothing new.
    recorded = await wired.outbox.record(ticket, "mock", b"{}", [])
    assert recorded is not None and recorded.state is Recording.FINISHED
    assert [type(m) for m in await wired.received(1)] == [RenderError]


async def test_the_publisher_refuses_to_send_outbox_events_itself(wired):
    with pytest.raises(TypeError, match="Outbox"):
        await wired.outbox.publisher.publish(ready("r-5"))
    with pytest.raises(TypeError, match="Outbox"):
        wired.outbox.publisher.publish_nowait(RenderAccepted(request_id="r-5", generator="mock"))


async def test_a_resumed_result_waits_for_a_subscriber_to_its_topic(wired):
    outbox = wired.outbox
    outbox.resume_grace_s = 5.0
    ticket = Ticket("r-6", "reply_to:carol", "carol")
    outbox.hold(ticket)
    finishing = asyncio.create_task(outbox.finish(ticket, ready("r-6"), resumed=True))
    assert await wired.nothing_more()  # the catch-all SUB joined before: but the audience is not told
    outbox.audience.observe(b"\x01ImageReady/carol")
    assert await finishing
    assert [type(m) for m in await wired.received(1)] == [ImageReady]


async def test_a_request_ended_before_journaling_whose_id_had_finished_gets_the_stored_event(wired):
    first = Ticket("r-7", "reply_to:dave", "dave")
    wired.outbox.hold(first)
    assert await wired.outbox.finish(first, ready("r-7"))
    # The same client's repeat, cancelled before it was journaled: no second terminal event,
    # the stored one again (the same content).
    again = Ticket("r-7", "reply_to:dave", "dave")
    wired.outbox.hold(again)
    assert not await wired.outbox.finish(again, RenderError(request_id="r-7", code="cancelled", message="x"))
    original, replayed = await wired.received(2)
    assert isinstance(replayed, ImageReady)
    assert original.model_dump(exclude={"seq"}) == replayed.model_dump(exclude={"seq"})
