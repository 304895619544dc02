"""Reference images sent raw as extra frames: rendered, refused when missing, resumed after a crash."""

from __future__ import annotations

import asyncio

import pytest

from image_server.client import RenderFailed
from image_server.journal import Journal, recent_entries
from schemas import ImageReady, ImageSource, RenderRequest
from tests.fakes.images import mean_colour, solid_bytes


def png(color: tuple[int, int, int], size: int = 64) -> bytes:
    return solid_bytes(color, (size, size))


async def test_image_sent_as_a_frame_is_used(service_factory, client_for):
    async with service_factory() as service, client_for(service) as client:
        result = await client.render(
            request_id="frame-ref",
            prompt="p",
            width=64,
            height=64,
            strength=0.1,
            reference_images=[ImageSource(frame=1)],
            images=[png((255, 0, 0)), png((0, 0, 255))],
        )
    red, green, blue = mean_colour(result.event.images[0].path)
    assert blue > 150 and blue > red + 60, "the second frame (blue) is the reference"


async def test_a_missing_frame_is_an_invalid_request(service_factory, client_for):
    async with service_factory() as service, client_for(service) as client:
        with pytest.raises(RenderFailed) as info:
            await client.render(
                request_id="frame-missing", prompt="p", reference_image=ImageSource(frame=2), images=[png((1, 2, 3))]
            )
    assert info.value.code == "invalid_request" and "[2]" in info.value.event.message


async def test_garbage_in_a_frame_is_a_reference_image_error(service_factory, client_for):
    async with service_factory() as service, client_for(service) as client:
        with pytest.raises(RenderFailed) as info:
            await client.render(
                request_id="frame-garbage", prompt="p", reference_image=ImageSource(frame=0), images=[b"not an image"]
            )
    assert info.value.code == "reference_image"


async def test_frames_are_journaled_and_an_interrupted_request_resumes_with_them(tmp_path, service_factory):
    request = RenderRequest(
        request_id="frame-resume", prompt="p", width=64, height=64, strength=0.1, reference_image=ImageSource(frame=0)
    )
    # A request accepted by a service that then died: journaled with its frame, no terminal event.
    async with Journal(tmp_path / "state") as journal:
        await journal.admit(request.request_id, "mock", request.model_dump_json(), [png((0, 200, 0))])
    async with service_factory():
        async with asyncio.timeout(5):
            while True:
                (entry,) = recent_entries(tmp_path / "state")
                if entry.finished_at is not None:
                    break
                await asyncio.sleep(0.02)
        async with Journal(tmp_path / "state") as journal:
            assert await journal.request_frames("frame-resume") == []  # dropped once finished
    event = ImageReady.model_validate_json(entry.terminal or "")
    red, green, blue = mean_colour(event.images[0].path)
    assert green > 120 and green > red + 60, "resumed with the journaled frame as its reference"
