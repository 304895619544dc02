"""Progress events nobody subscribed to are neither built nor sent; every event a
subscriber relies on still arrives, and a monitor still sees ``seq`` without gaps."""

from __future__ import annotations

import asyncio
from typing import Any

import zmq
import zmq.asyncio

from schemas import ImageReady, RenderAccepted, RenderProgress, RenderRequest, decode_frames, encode_message


class Subscriber:
    """A bare SUB on the service's events with the given topics, and a PUB to its requests."""

    def __init__(self, context: zmq.asyncio.Context, service: Any, topics: list[bytes]) -> None:
        self.sub = context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        for topic in [b"Heartbeat", *topics]:
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.sub.connect(service.endpoints["events"])
        self.pub = context.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.connect(service.endpoints["requests"])
        self.received: list[Any] = []  # everything, Heartbeats included

    async def _next(self) -> Any:
        message = decode_frames(await self.sub.recv_multipart()).message
        self.received.append(message)
        return message

    async def render(self, request: RenderRequest) -> list[Any]:
        """Send ``request`` until RenderAccepted; every event of it up to its ImageReady."""
        seen: list[Any] = []
        async with asyncio.timeout(10):
            while not any(isinstance(e, RenderAccepted) for e in seen):
                await self.pub.send_multipart(encode_message(request))
                while await self.sub.poll(100):
                    seen.append(await self._next())
            while not any(isinstance(e, ImageReady) for e in seen):
                seen.append(await self._next())
        return [e for e in seen if getattr(e, "request_id", None) == request.request_id]

    def close(self) -> None:
        self.sub.close(0)
        self.pub.close(0)


async def test_progress_nobody_subscribed_to_is_not_built_but_subscribers_get_theirs(service_factory, context):
    async with service_factory() as service:
        built: list[Any] = []
        observe = service.publisher.observer
        service.publisher.observer = lambda event: (built.append(event), observe and observe(event))
        quiet = Subscriber(context, service, [b"RenderAccepted/quiet", b"ImageReady/quiet", b"RenderError/quiet"])
        chatty = Subscriber(
            context, service, [b"RenderAccepted/chatty", b"RenderProgress/chatty", b"ImageReady/chatty"]
        )
        try:
            quiet_events = await quiet.render(RenderRequest(request_id="q-1", prompt="p", reply_to="quiet"))
            chatty_events = await chatty.render(RenderRequest(request_id="c-1", prompt="p", reply_to="chatty"))
        finally:
            quiet.close()
            chatty.close()
    assert [type(e) for e in quiet_events] == [RenderAccepted, ImageReady]
    stages = [e.stage for e in chatty_events if isinstance(e, RenderProgress)]
    assert stages[0] == "started" and stages[-1] == "storing" and "generating" in stages
    progress_built = [e.request_id for e in built if isinstance(e, RenderProgress)]
    assert "q-1" not in progress_built and progress_built.count("c-1") == len(stages)


async def test_a_monitor_subscribed_to_everything_gets_progress_and_seq_without_gaps(service_factory, context):
    async with service_factory() as service:
        monitor = Subscriber(context, service, [b""])
        try:
            events = await monitor.render(RenderRequest(request_id="m-1", prompt="p"))
        finally:
            monitor.close()
    assert any(isinstance(e, RenderProgress) for e in events)
    # From its first event on, the monitor saw every seq the service stamped, one by one.
    seqs = [e.seq for e in monitor.received]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


async def test_render_client_subscribes_to_progress_only_when_it_hands_it_on(service_factory, client_for):
    """A plain RenderClient costs the service no progress events; one with on_event (given
    up front or set later) gets them, in order, before its result."""
    async with service_factory() as service:
        built: list[str] = []
        observer = service.publisher.observer

        def watch(event: Any) -> None:
            built.append(type(event).__name__)
            if observer is not None:
                observer(event)

        service.publisher.observer = watch  # sees every event built and sent
        async with client_for(service) as plain:
            await plain.render(RenderRequest(request_id="plain-1", prompt="p", width=64, height=64))
        # RenderAccepted and ImageReady only: no progress event was even built.
        assert [name for name in built if name != "Heartbeat"] == ["RenderAccepted", "ImageReady"]
        seen: list[Any] = []
        async with client_for(service) as late:
            late.on_event = seen.append
            await late.render(RenderRequest(request_id="late-1", prompt="p", width=64, height=64))
        kinds = [type(event) for event in seen]
        assert kinds[0] is RenderAccepted and kinds[-1] is ImageReady
        assert RenderProgress in kinds
