"""End to end through real ZMQ sockets on 127.0.0.1 with the mock generator."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import time
from pathlib import Path

import pytest
import zmq
from PIL import Image

from image_server.client import RenderFailed
from image_server.generators.base import Capabilities, GeneratorConfig, RenderJob
from image_server.generators.mock import MockGenerator
from schemas import (
    CancelRequest,
    Heartbeat,
    ImageReady,
    ImageSource,
    RenderAccepted,
    RenderError,
    RenderRequest,
    RequestConflict,
    ServiceStatus,
    StatusRequest,
    decode_frames,
    encode_message,
)
from tests.fakes.images import solid_bytes


def png_data_uri(color: tuple[int, int, int], size: int = 64) -> str:
    return "data:image/png;base64," + base64.b64encode(solid_bytes(color, (size, size))).decode()


async def test_text_to_image_file_delivery(service_factory, client_for):
    async with service_factory() as service, client_for(service) as client:
        result = await client.render(request_id="t2i-1", prompt="a red fox", width=256, height=128, metadata={"k": [1]})
    event = result.event
    assert event.generator == "mock" and event.request_id == "t2i-1"
    image = event.images[0]
    path = Path(image.path or "")
    assert path.is_file() and path.name == "t2i-1_0.png"
    assert path.parent.parent == service.config.output_dir / "default" / "mock"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == image.sha256
    with Image.open(path) as img:
        assert img.size == (256, 128)
    assert event.uri == image.uri and image.uri.startswith("file://")
    assert event.metadata == {"k": [1]}
    assert event.timings.total >= event.timings.generate > 0


async def test_image_to_image_uses_the_reference(service_factory, client_for):
    async with service_factory() as service, client_for(service) as client:
        result = await client.render(
            request_id="i2i-1",
            prompt="make it blue",
            width=64,
            height=64,
            strength=0.1,
            reference_image=ImageSource(image_data=png_data_uri((0, 0, 255))),
            delivery="inline",
        )
    data = base64.b64decode(result.event.images[0].data or "")
    with Image.open(io.BytesIO(data)) as img:
        red, green, blue = img.convert("RGB").resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
    assert blue > 150 and blue > red + 60 and blue > green + 60


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
async def test_inline_delivery_carries_the_image(service_factory, client_for, output_format):
    async with service_factory() as service, client_for(service) as client:
        result = await client.render(
            request_id=f"inline-{output_format}",
            prompt="p",
            width=96,
            height=64,
            delivery="inline",
            output_format=output_format,
        )
    image = result.event.images[0]
    assert image.path is None and image.format == output_format
    with Image.open(io.BytesIO(base64.b64decode(image.data or ""))) as img:
        assert img.size == (96, 64) and img.format.lower() == output_format


async def test_frames_delivery_sends_raw_bytes(service_factory, client_for):
    async with service_factory() as service, client_for(service) as client:
        result = await client.render(
            request_id="frames-1", prompt="p", width=64, height=64, delivery="frames", num_images=2
        )
    assert [image.frame for image in result.event.images] == [0, 1]
    for index, image in enumerate(result.event.images):
        blob = result.image_bytes(index)
        assert blob is not None and hashlib.sha256(blob).hexdigest() == image.sha256
        with Image.open(io.BytesIO(blob)) as img:
            assert img.size == (64, 64)


async def test_url_delivery_without_provider_url_gives_file_uri(service_factory, client_for):
    async with service_factory() as service, client_for(service) as client:
        result = await client.render(request_id="url-1", prompt="p", width=64, height=64, delivery="url")
    assert result.event.images[0].uri.startswith("file://")


async def test_reply_to_topics_reach_only_their_client(service_factory, context, raw_peer):
    async with service_factory() as service:
        peer = await raw_peer(service)
        mine = context.socket(zmq.SUB)
        mine.setsockopt(zmq.SUBSCRIBE, b"ImageReady/alice")
        mine.connect(service.endpoints["events"])
        try:
            # The peer's catch-all SUB proves when each event went out; `mine` must see alice's only.
            async with asyncio.timeout(5):
                while True:
                    await peer.send(encode_message(RenderRequest(request_id="probe-a", prompt="p", reply_to="alice")))
                    if await mine.poll(300):
                        break
            await peer.send(encode_message(RenderRequest(request_id="for-bob", prompt="p", reply_to="bob")))
            await peer.send(encode_message(RenderRequest(request_id="for-alice", prompt="p", reply_to="alice")))
            bob = await peer.next_event(lambda m: isinstance(m, ImageReady) and m.request_id == "for-bob")
            assert bob.topic == "ImageReady/bob"
            seen = []
            async with asyncio.timeout(5):
                while "for-alice" not in seen:
                    frames = await mine.recv_multipart()
                    assert frames[0] == b"ImageReady/alice"
                    seen.append(json.loads(frames[1])["request_id"])
            assert "for-bob" not in seen
        finally:
            mine.close(0)


async def test_heartbeats_and_status(service_factory, raw_peer):
    async with service_factory(
        generators={"mock": {"strategy": "mock"}, "slow": {"strategy": "mock", "delay_s": 1}}
    ) as service:
        peer = await raw_peer(service)
        beats = [await peer.next_event(lambda m: isinstance(m, Heartbeat)) for _ in range(2)]
        assert beats[1].message.seq > beats[0].message.seq
        await peer.send(encode_message(StatusRequest(request_id="s1", reply_to="ops")))
        status = await peer.next_event(lambda m: isinstance(m, ServiceStatus) and m.request_id == "s1")
    assert status.topic == "ServiceStatus/ops"
    assert [g.name for g in status.message.generators] == ["mock", "slow"]
    assert status.message.default_generator == "mock" and status.message.uptime_s > 0


async def test_xpub_greets_a_new_subscriber_with_a_heartbeat(service_factory, context):
    async with service_factory(heartbeat_interval_s=3600) as service:
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"Heartbeat")
        sub.connect(service.endpoints["events"])
        try:
            async with asyncio.timeout(2):  # far below the hour-long interval
                frames = await sub.recv_multipart()
            assert isinstance(decode_frames(frames).message, Heartbeat)
        finally:
            sub.close(0)


async def error_for(peer, frames, request_id):
    await peer.send(frames)
    found = await peer.next_event(lambda m: isinstance(m, RenderError) and m.request_id == request_id)
    return found.message


async def test_bad_input_gets_an_error_or_is_counted_and_service_keeps_serving(service_factory, raw_peer, client_for):
    async with service_factory(limits={"max_message_bytes": 4096}) as service:
        peer = await raw_peer(service)
        cases = {
            "bad-json": [b"RenderRequest", b'{"request_id": "bad-json", "prompt": '],
            "bad-schema": [b"RenderRequest", b'{"request_id": "bad-schema", "prompt": ""}'],
            "bad-width": [b"RenderRequest", b'{"request_id": "bad-width", "prompt": "p", "width": 99999}'],
            "mismatch": [b"CancelRequest", b'{"type": "RenderRequest", "request_id": "mismatch", "prompt": "p"}'],
            "too-big": [b"RenderRequest", json.dumps({"request_id": "too-big", "prompt": "x" * 5000}).encode()],
            "outbound": [b"RenderAccepted", b'{"request_id": "outbound", "generator": "mock"}'],
            "two-refs": [
                b"RenderRequest",
                b'{"request_id": "two-refs", "prompt": "p", "reference_image": {"uri": "data:,", "image_data": "x"}}',
            ],
        }
        errors = {}
        for request_id, frames in cases.items():
            errors[request_id] = error = await error_for(peer, frames, request_id)
            assert error.code == "invalid_request", (request_id, error)
        assert "exceeds the limit" in errors["too-big"].message
        # One terminal event per id, ever: the same bad message again gets a RequestConflict.
        await peer.send(cases["too-big"])
        await peer.next_event(lambda m: isinstance(m, RequestConflict) and m.request_id == "too-big")
        unknown = await error_for(
            peer, encode_message(RenderRequest(request_id="unk", prompt="p", generator="nope")), "unk"
        )
        assert unknown.code == "unknown_generator" and "mock" in unknown.message
        before = service.counters["undecodable"]
        for garbage in ([b"\xff\xfe"], [b"hello"], [b"RenderRequest", b"[1, 2]"], [b"\x00" * 10, b"{}", b"x"], [b""]):
            await peer.send(garbage)
        async with client_for(service) as client:
            result = await client.render(request_id="after-garbage", prompt="still alive", width=64, height=64)
        assert result.event.request_id == "after-garbage"
        assert service.counters["undecodable"] - before == 5


async def test_single_frame_compatibility_forms(service_factory, raw_peer):
    async with service_factory() as service:
        peer = await raw_peer(service)
        await peer.send([b'RenderRequest {"request_id": "compat-1", "prompt": "p", "width": 64, "height": 64}'])
        await peer.send(
            [b'{"type": "RenderRequest", "request_id": "compat-2", "prompt": "p", "width": 64, "height": 64}']
        )
        waiting = {"compat-1", "compat-2"}
        while waiting:
            found = await peer.next_event(lambda m: isinstance(m, ImageReady) and m.request_id in waiting)
            waiting.discard(found.message.request_id)


class TextOnly(MockGenerator):
    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(text_to_image=True, image_to_image=False, max_images=1, max_size=512, max_prompt_chars=20)


def text_only_factory(name: str, config: GeneratorConfig) -> MockGenerator:
    cls = TextOnly if name == "textonly" else MockGenerator
    return cls(config, name=name)


async def test_capabilities_refused_with_unsupported(service_factory, raw_peer):
    generators = {"mock": {"strategy": "mock"}, "textonly": {"strategy": "mock"}}
    async with service_factory(generators=generators, factory=text_only_factory) as service:
        peer = await raw_peer(service)
        ref = ImageSource(image_data=png_data_uri((1, 2, 3)))
        cases = {
            "with-ref": {"reference_image": ref},
            "two-images": {"num_images": 2},
            "too-wide": {"width": 1024},
        }
        for rid, fields in cases.items():
            request = RenderRequest(request_id=rid, prompt="p", generator="textonly", **fields)
            error = await error_for(peer, encode_message(request), rid)
            assert error.code == "unsupported" and error.generator == "textonly", error
        long_prompt = RenderRequest(request_id="long", prompt="x" * 21, generator="textonly")
        assert (await error_for(peer, encode_message(long_prompt), "long")).code == "prompt_too_long"


async def test_generator_config_overrides(service_factory, client_for):
    async with service_factory() as service, client_for(service) as client:
        with pytest.raises(RenderFailed) as refused:
            await client.render(request_id="ovr-bad", prompt="p", generator_config={"strategy": "fal", "delay_s": 0})
        assert refused.value.code == "invalid_request" and "strategy" in refused.value.event.message
        with pytest.raises(RenderFailed) as invalid:
            await client.render(request_id="ovr-neg", prompt="p", generator_config={"delay_s": -1})
        assert invalid.value.code == "invalid_request" and "delay_s" in invalid.value.event.message
        await client.render(request_id="ovr-ok", prompt="p", width=64, height=64, generator_config={"style": "debug"})
        assert ("mock", '{"style":"debug"}') in service.manager.cached()


async def test_generation_failure_and_internal_error_are_reported(service_factory, client_for):
    def handler(job: RenderJob) -> None:
        if job.request.prompt == "boom":
            raise RuntimeError("secret internals")

    def factory(name, config):
        return MockGenerator(config, name=name, handler=handler)

    generators = {"mock": {"strategy": "mock"}, "flaky": {"strategy": "mock", "fail_rate": 1.0, "retries": 0}}
    async with service_factory(generators=generators, factory=factory) as service, client_for(service) as client:
        with pytest.raises(RenderFailed) as failed:
            await client.render(request_id="fail-1", prompt="p", generator="flaky")
        assert failed.value.code == "generation_failed" and failed.value.event.retryable
        with pytest.raises(RenderFailed) as internal:
            await client.render(request_id="boom-1", prompt="boom")
        assert internal.value.code == "internal" and "secret internals" not in internal.value.event.message
        ok = await client.render(request_id="ok-after", prompt="fine", width=64, height=64)
        assert ok.event.request_id == "ok-after"


async def test_twenty_slow_requests_run_concurrently(service_factory, client_for):
    generators = {"mock": {"strategy": "mock", "delay_s": 0.2, "concurrency": 20}}
    async with service_factory(generators=generators) as service, client_for(service) as client:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(client.render(request_id=f"c-{i}", prompt="p", width=64, height=64) for i in range(20))
        )
        elapsed = time.perf_counter() - started
    assert len({r.event.request_id for r in results}) == 20
    # One after another would take 4 s; together they take one delay plus overhead.
    assert elapsed < 1.5, elapsed
    assert max(r.event.timings.queued for r in results) < 500


async def test_duplicate_in_flight_request_renders_once(service_factory, raw_peer):
    renders = []

    def handler(job: RenderJob) -> None:
        renders.append(job.request.request_id)

    def factory(name, config):
        return MockGenerator(config, name=name, handler=handler)

    generators = {"mock": {"strategy": "mock", "delay_s": 0.3}}
    async with service_factory(generators=generators, factory=factory) as service:
        peer = await raw_peer(service)
        frames = encode_message(RenderRequest(request_id="dup-1", prompt="p", width=64, height=64))
        await peer.send(frames)
        await peer.next_event(lambda m: isinstance(m, RenderAccepted) and m.request_id == "dup-1")
        await peer.send(frames)
        await peer.next_event(lambda m: isinstance(m, RenderAccepted) and m.request_id == "dup-1")
        await peer.next_event(lambda m: isinstance(m, ImageReady) and m.request_id == "dup-1")
    assert renders == ["dup-1"]


async def test_overloaded_beyond_in_flight_and_queue_bounds(service_factory, client_for):
    generators = {"mock": {"strategy": "mock", "delay_s": 0.5}}
    limits = {"max_in_flight": 1, "max_queued": 1, "max_client_share": 1.0}  # one client may fill it
    async with service_factory(generators=generators, limits=limits) as service:
        async with client_for(service) as client:
            first = asyncio.create_task(client.render(request_id="o-1", prompt="p", width=64, height=64))
            second = asyncio.create_task(client.render(request_id="o-2", prompt="p", width=64, height=64))
            async with asyncio.timeout(5):
                while len(service.active) < 2:
                    await asyncio.sleep(0.01)
            with pytest.raises(RenderFailed) as third:
                await client.render(request_id="o-3", prompt="p")
            assert third.value.code == "overloaded" and third.value.event.retryable
            assert {(await first).event.request_id, (await second).event.request_id} == {"o-1", "o-2"}


async def test_request_timeout(service_factory, client_for):
    generators = {"mock": {"strategy": "mock", "delay_s": 5}}
    async with service_factory(generators=generators) as service, client_for(service) as client:
        with pytest.raises(RenderFailed) as timed_out:
            await client.render(request_id="slow-1", prompt="p", timeout_s=0.2)
    assert timed_out.value.code == "timeout"


async def test_cancel_running_request(service_factory, client_for):
    generators = {"mock": {"strategy": "mock", "delay_s": 5}}
    async with service_factory(generators=generators) as service, client_for(service) as client:
        pending = asyncio.create_task(client.render(request_id="cancel-1", prompt="p"))
        async with asyncio.timeout(5):
            while service.manager.scheduler.in_flight == 0:
                await asyncio.sleep(0.01)
        await client.cancel("cancel-1")
        with pytest.raises(RenderFailed) as cancelled:
            await pending
    assert cancelled.value.code == "cancelled"


async def test_cancel_unknown_request_is_harmless(service_factory, raw_peer, client_for):
    async with service_factory() as service:
        peer = await raw_peer(service)
        await peer.send(encode_message(CancelRequest(request_id="never-sent")))
        async with client_for(service) as client:
            assert (await client.render(request_id="fine", prompt="p", width=64, height=64)).event


async def test_channel_supersedes_older_request(service_factory, client_for):
    generators = {"mock": {"strategy": "mock", "delay_s": 0.5}}
    async with service_factory(generators=generators) as service, client_for(service) as client:
        older = asyncio.create_task(client.render(request_id="ch-1", prompt="p", channel="wall", width=64, height=64))
        async with asyncio.timeout(5):
            while "ch-1" not in service.active:
                await asyncio.sleep(0.01)
        newer = await client.render(request_id="ch-2", prompt="p", channel="wall", width=64, height=64)
        with pytest.raises(RenderFailed) as superseded:
            await older
    assert superseded.value.code == "superseded" and newer.event.request_id == "ch-2"
