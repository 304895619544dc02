"""RenderClient robustness: a failing on_event callback, image bytes for every delivery,
stale heartbeats noticed, conflict notices that end nothing."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
from collections.abc import AsyncIterator

import pytest
import zmq
import zmq.asyncio

from image_server.client import RenderClient
from schemas import Heartbeat, ImageReady, RenderAccepted, RequestConflict, decode_frames, encode_message


async def test_an_exception_in_on_event_is_logged_and_reading_goes_on(service_factory, client_for, caplog):
    seen: list[str] = []

    def on_event(event: object) -> None:
        seen.append(type(event).__name__)
        raise RuntimeError("a bug in the user's callback")

    async with service_factory() as service, client_for(service, on_event=on_event) as client:
        for index in range(3):
            result = await client.render(request_id=f"cb-{index}", prompt="p", width=64, height=64, timeout=10)
            assert result.event.request_id == f"cb-{index}"
    assert seen.count("ImageReady") == 3 and client.callback_errors >= 3
    assert "on_event raised" in caplog.text and "a bug in the user's callback" in caplog.text


@pytest.mark.parametrize("delivery", ["file", "inline", "frames", "url"])
async def test_image_bytes_for_every_delivery(service_factory, client_for, delivery):
    async with service_factory() as service, client_for(service) as client:
        result = await client.render(
            request_id=f"bytes-{delivery}", prompt="p", width=64, height=64, delivery=delivery, num_images=2
        )
    for index, image in enumerate(result.event.images):
        data = result.image_bytes(index)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        if image.sha256 is not None:
            assert hashlib.sha256(data).hexdigest() == image.sha256


def test_image_bytes_downloads_a_provider_url_only_when_asked():
    from image_server.client import RenderResult
    from schemas import OutputImage

    event = ImageReady(
        request_id="u",
        generator="g",
        images=[OutputImage(uri="https://cdn.example/x.png", width=1, height=1, format="png")],
    )
    with pytest.raises(ValueError, match="fetch_url=True"):
        RenderResult(event).image_bytes()


class FakeService:
    """Bare sockets playing a service whose heartbeats stop after it accepted a request."""

    def __init__(self, context: zmq.asyncio.Context) -> None:
        self.events = context.socket(zmq.XPUB)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.bind("tcp://127.0.0.1:0")
        self.requests = context.socket(zmq.SUB)
        self.requests.setsockopt(zmq.LINGER, 0)
        self.requests.setsockopt(zmq.SUBSCRIBE, b"")
        self.requests.bind("tcp://127.0.0.1:0")
        self.beating = True
        self.received = 0
        self._seq = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []

    def endpoint(self, socket: zmq.asyncio.Socket) -> str:
        return socket.getsockopt(zmq.LAST_ENDPOINT).decode()

    async def __aenter__(self) -> FakeService:
        self._tasks = [asyncio.create_task(self._beat()), asyncio.create_task(self._serve())]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.events.close(0)
        self.requests.close(0)

    async def _beat(self) -> None:
        while True:
            if self.beating:
                beat = Heartbeat(service_id="first", seq=next(self._seq), interval_s=0.1, uptime_s=1.0)
                await self.events.send_multipart(encode_message(beat))
            await asyncio.sleep(0.05)

    async def _serve(self) -> None:
        while True:
            request = decode_frames(await self.requests.recv_multipart()).message
            self.received += 1
            reply_to = request.reply_to
            if self.received == 1:
                # Accept, then fall silent (a crash): the client must notice the heartbeats stop.
                accepted = RenderAccepted(
                    service_id="first", seq=next(self._seq), request_id=request.request_id, generator="g"
                )
                await self.events.send_multipart(encode_message(accepted, reply_to=reply_to))
                self.beating = False
            else:
                # A successor answers the re-sent request (journal resume would do this).
                conflict = RequestConflict(
                    service_id="first", seq=next(self._seq), request_id=request.request_id, message="x"
                )
                await self.events.send_multipart(encode_message(conflict, reply_to=reply_to))
                ready = ImageReady(service_id="second", seq=1, request_id=request.request_id, generator="g", images=[])
                await self.events.send_multipart(encode_message(ready, reply_to=reply_to))


@pytest.fixture
async def fake_service(context: zmq.asyncio.Context) -> AsyncIterator[FakeService]:
    async with FakeService(context) as fake:
        yield fake


async def test_stale_heartbeats_are_noticed_and_the_request_is_sent_again(fake_service, context):
    async with RenderClient(
        fake_service.endpoint(fake_service.requests),
        fake_service.endpoint(fake_service.events),
        context=context,
        nudge_interval_s=120.0,  # only stale heartbeats can explain a re-send within the test
    ) as client:
        await client.wait_ready(5)
        result = await client.render(request_id="stale-1", prompt="p", timeout=10)
    assert result.event.service_id == "second" and fake_service.received >= 2
    # The RequestConflict that came first did not end the render, and was counted.
    assert client.conflicts == 1
