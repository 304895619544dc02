"""A gateway and workers around a real nats-server: clients see the same protocol."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
from pathlib import Path

import pytest
from PIL import Image

from image_server.client import RenderFailed
from image_server.cluster import jobs
from schemas import ImageSource
from tests.cluster.conftest import Deployment


async def test_a_request_renders_on_a_worker_and_arrives_through_the_gateway(deployment: Deployment) -> None:
    gateway = await deployment.gateway()
    await deployment.worker()
    client = await deployment.client(gateway)
    result = await client.render(request_id="one", prompt="a red square", width=96, height=64, timeout=20)
    image = result.event.images[0]
    assert image.path is not None
    data = Path(image.path).read_bytes()
    # The file is under the gateway's output_dir, written from the worker's bytes.
    assert Path(image.path).is_relative_to(gateway.config.output_dir.resolve())
    assert hashlib.sha256(data).hexdigest() == image.sha256
    assert (image.width, image.height) == (96, 64)
    assert result.event.service_id == "gw"


@pytest.mark.parametrize("inline_bytes", [jobs.INLINE_BYTES, 0], ids=["small-images-inline", "via-object-store"])
async def test_inline_and_frames_delivery_carry_the_workers_bytes(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch, inline_bytes: int
) -> None:
    monkeypatch.setattr(jobs, "INLINE_BYTES", inline_bytes)
    gateway = await deployment.gateway()
    await deployment.worker()
    client = await deployment.client(gateway)
    inline = await client.render(request_id="inline", prompt="x", width=64, height=64, delivery="inline", timeout=20)
    data = base64.b64decode(inline.event.images[0].data or "")
    assert hashlib.sha256(data).hexdigest() == inline.event.images[0].sha256
    frames = await client.render(
        request_id="frames", prompt="x", width=64, height=64, num_images=2, delivery="frames", timeout=20
    )
    assert [image.frame for image in frames.event.images] == [0, 1]
    for index, image in enumerate(frames.event.images):
        assert hashlib.sha256(frames.image_bytes(index) or b"").hexdigest() == image.sha256


async def test_a_repeat_of_a_finished_request_gets_the_stored_event(deployment: Deployment) -> None:
    gateway = await deployment.gateway()
    worker = await deployment.worker()
    client = await deployment.client(gateway)
    first = await client.render(request_id="again", prompt="x", width=64, height=64, timeout=20)
    second = await client.render(request_id="again", prompt="x", width=64, height=64, timeout=20)
    assert second.event.images[0].sha256 == first.event.images[0].sha256
    assert worker.counters["completed"] == 1  # rendered once
    assert gateway.counters["repeated"] == 1


async def test_an_unknown_generator_is_refused_at_the_gateway(deployment: Deployment) -> None:
    gateway = await deployment.gateway()
    client = await deployment.client(gateway)
    try:
        await client.render(request_id="nope", prompt="x", generator="nonexistent", timeout=10)
    except RenderFailed as exc:
        assert exc.code == "unknown_generator"
    else:
        raise AssertionError("an unknown generator must be refused")


async def test_status_shows_the_workers_and_the_queue(deployment: Deployment) -> None:
    gateway = await deployment.gateway()
    await deployment.worker("w1")
    await deployment.worker("w2")
    client = await deployment.client(gateway)
    async with asyncio.timeout(10):
        while True:
            status = await client.status()
            assert status.cluster is not None
            if len(status.cluster.workers) == 2:
                break
    assert [w.worker_id for w in status.cluster.workers] == ["w1", "w2"]
    assert status.cluster.workers[0].generators == ["mock"]
    assert set(status.cluster.queued) == {"high", "normal", "low"}


async def test_reference_images_sent_as_frames_reach_the_worker(deployment: Deployment) -> None:
    gateway = await deployment.gateway()
    worker = await deployment.worker()
    client = await deployment.client(gateway)
    buffer = io.BytesIO()
    Image.new("RGB", (80, 80), (200, 30, 30)).save(buffer, "PNG")
    result = await client.render(
        request_id="with-ref",
        prompt="x",
        width=64,
        height=64,
        reference_images=[ImageSource(frame=0)],
        images=[buffer.getvalue()],
        timeout=20,
    )
    assert result.event.images and worker.counters["completed"] == 1


async def test_a_request_bigger_than_a_nats_message_travels_through_the_object_store(deployment: Deployment) -> None:
    gateway = await deployment.gateway()
    worker = await deployment.worker()
    client = await deployment.client(gateway)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (700, 700), os.urandom(700 * 700 * 3)).save(buffer, "PNG")
    inline = base64.b64encode(buffer.getvalue()).decode()
    assert len(inline) > 1024 * 1024  # over NATS's default max_payload
    result = await client.render(
        request_id="big-request",
        prompt="x",
        width=64,
        height=64,
        reference_image=ImageSource(image_data=inline),
        timeout=30,
    )
    assert result.event.images and worker.counters["completed"] == 1
