"""How big references are checked without holding the event loop: JPEGs validated at 1/8 scale
(as strict as a full decode), headers checked from the start of the base64 only, references
decoded at reduced scale for a generator that shrinks them anyway; and big JPEG references
through the service, as base64 and as a frame."""

from __future__ import annotations

import base64
import io
import os
import random
import struct

import pytest
from PIL import Image

from image_server.config import ReferencesConfig
from image_server.errors import ReferenceImageError
from image_server.generators.base import ReferenceImage
from image_server.inline_data import decode_base64_head
from image_server.precheck import HEADER_BYTES, precheck_embedded_references
from image_server.references import decode_image
from schemas import ImageSource, RenderRequest
from tests.fakes.images import encode, mean_colour, noise

MAX_PIXELS = 4096 * 4096


def full_size_outcome(data: bytes) -> str:
    """What a plain full-size Pillow decode says: 'ok' or the exception's name."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as exc:
        return type(exc).__name__
    return "ok"


def checked_outcome(data: bytes) -> str:
    try:
        decode_image(data, max_pixels=MAX_PIXELS)
    except ReferenceImageError:
        return "refused"
    return "ok"


@pytest.mark.parametrize(
    "params",
    [
        {"quality": 90},
        {"quality": 75, "progressive": True},
        {"quality": 95, "subsampling": 0},
        {"quality": 80, "optimize": True},
    ],
    ids=["baseline", "progressive", "444", "optimized"],
)
def test_jpeg_checked_at_reduced_scale_fails_exactly_where_a_full_decode_fails(params):
    data = encode(noise((333, 211)), "JPEG", **params)
    rng = random.Random(len(data))
    damaged = [data[:cut] for cut in range(len(data) // 10, len(data), len(data) // 10)]
    damaged += [data[:-1], data[:-2], data[:-3]]
    for _ in range(8):
        flipped = bytearray(data)
        flipped[rng.randrange(len(data) // 3, len(data))] ^= 0xFF
        damaged.append(bytes(flipped))
    refused = 0
    for sample in damaged:
        full = full_size_outcome(sample)
        assert checked_outcome(sample) == ("ok" if full == "ok" else "refused"), full
        refused += full != "ok"
    assert refused >= 9  # the cuts, at least, are caught


def test_a_checked_jpeg_keeps_its_bytes_and_full_size():
    data = encode(noise((1000, 600)), "JPEG", quality=85)
    reference = decode_image(data, max_pixels=MAX_PIXELS)
    assert (reference.format, reference.width, reference.height) == ("jpeg", 1000, 600)
    assert reference.data == data


def jpeg_with_long_header(size: tuple[int, int], segments: int) -> bytes:
    """A real JPEG with ``segments`` APP15 segments of 60 KB between SOI and the frame header."""
    plain = encode(Image.new("RGB", size, (20, 200, 40)), "JPEG", quality=90)
    body = bytes(60_000)
    app = (b"\xff\xef" + struct.pack(">H", len(body) + 2) + body) * segments
    return plain[:2] + app + plain[2:]


def request_with(data: bytes) -> RenderRequest:
    return RenderRequest(
        request_id="pre", prompt="p", reference_images=[ImageSource(image_data=base64.b64encode(data).decode())]
    )


def test_a_header_longer_than_the_head_that_is_decoded_still_passes_the_precheck():
    data = jpeg_with_long_header((64, 48), segments=8)
    head, complete = decode_base64_head(base64.b64encode(data).decode(), len(data), HEADER_BYTES)
    assert not complete and b"\xff\xc0" not in head  # the frame header is past the decoded start
    precheck_embedded_references(request_with(data), [], ReferencesConfig())


def test_the_precheck_refuses_too_many_pixels_even_behind_a_long_header():
    data = jpeg_with_long_header((100, 100), segments=8)
    with pytest.raises(ReferenceImageError, match=r"reference image 0: image is 100x100") as info:
        precheck_embedded_references(request_with(data), [], ReferencesConfig(max_pixels=64 * 64))
    assert info.value.request_id == "pre"


def test_to_pil_at_least_decodes_a_jpeg_smaller_but_never_below_the_size_asked():
    picture = Image.new("RGB", (2048, 1024), (200, 30, 30))
    jpeg = ReferenceImage(data=encode(picture, "JPEG", quality=90), format="jpeg", width=2048, height=1024)
    reduced = jpeg.to_pil(at_least=(256, 256))
    assert reduced.size == (512, 256)  # 1/4: 1/8 would make the height 128
    assert all(abs(a - b) <= 3 for a, b in zip(reduced.getpixel((10, 10)), (200, 30, 30), strict=True))
    assert jpeg.to_pil().size == (2048, 1024)
    assert jpeg.to_pil(at_least=(2000, 1000)).size == (2048, 1024)
    png = ReferenceImage(data=encode(picture, "PNG"), format="png", width=2048, height=1024)
    assert png.to_pil(at_least=(256, 256)).size == (2048, 1024)  # only JPEG can be decoded smaller


def big_tinted_jpeg(colour: tuple[int, int, int], side: int = 2048) -> bytes:
    """A JPEG of several MB: noise over ``colour``, so it barely compresses."""
    grain = noise((side, side))
    return encode(Image.blend(Image.new("RGB", grain.size, colour), grain, 0.25), "JPEG", quality=95)


async def test_big_jpeg_references_as_base64_and_as_a_frame_guide_the_render(service_factory, client_for):
    blue, red = big_tinted_jpeg((20, 40, 230)), big_tinted_jpeg((230, 30, 20))
    assert min(len(blue), len(red)) > 2 * 1024 * 1024  # the chunked receive and decode paths
    async with service_factory() as service, client_for(service) as client:
        as_base64 = await client.render(
            request_id="big-b64",
            prompt="p",
            width=64,
            height=64,
            strength=0.1,
            reference_images=[ImageSource(image_data=base64.b64encode(blue).decode())],
        )
        as_frame = await client.render(
            request_id="big-frame",
            prompt="p",
            width=64,
            height=64,
            strength=0.1,
            reference_images=[ImageSource(frame=0)],
            images=[red],
        )
    r, _, b = mean_colour(as_base64.event.images[0].path)
    assert b > r + 100, "the blue reference dominates"
    r, _, b = mean_colour(as_frame.event.images[0].path)
    assert r > b + 100, "the red reference dominates"


async def test_bad_base64_past_the_checked_head_is_still_a_reference_image_error(service_factory, client_for):
    from image_server.client import RenderFailed

    text = base64.b64encode(big_tinted_jpeg((90, 90, 90), side=1024)).decode()
    broken = text[:-1000] + "*" + text[-999:]
    async with service_factory() as service, client_for(service) as client:
        with pytest.raises(RenderFailed) as failed:
            await client.render(request_id="bad-tail", prompt="p", reference_image=ImageSource(image_data=broken))
    assert failed.value.code == "reference_image" and "not valid base64" in failed.value.event.message


def test_a_frame_is_prechecked_from_its_start_and_whole_when_its_header_is_longer():
    long_header = jpeg_with_long_header((100, 100), segments=8)
    request = RenderRequest(request_id="pre", prompt="p", reference_images=[ImageSource(frame=0)])
    precheck_embedded_references(request, [bytearray(long_header)], ReferencesConfig())
    with pytest.raises(ReferenceImageError, match=r"reference image 0: image is 100x100"):
        precheck_embedded_references(request, [bytearray(long_header)], ReferencesConfig(max_pixels=64 * 64))
    with pytest.raises(ReferenceImageError, match="reference image 0: not a supported image"):
        precheck_embedded_references(request, [bytearray(os.urandom(HEADER_BYTES + 10))], ReferencesConfig())


async def test_gil_bound_work_runs_at_the_loops_priority_and_image_work_below_it(service_factory):
    # A GIL-holding thread at nice 10 was preempted while holding the GIL, and the loop
    # waited for it; image work (GIL released) stays below the loop's priority.
    import asyncio

    from image_server.offload import WORKER_NICENESS, run_gil_bound

    loop_nice = os.getpriority(os.PRIO_PROCESS, 0)  # this thread's (Linux: per thread)
    async with service_factory():
        assert await run_gil_bound(os.getpriority, os.PRIO_PROCESS, 0) == loop_nice
        assert await asyncio.to_thread(os.getpriority, os.PRIO_PROCESS, 0) == max(loop_nice, WORKER_NICENESS)
