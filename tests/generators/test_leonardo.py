"""LeonardoGenerator against a local fake of Leonardo's REST API v1 and its S3 upload bucket."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import AsyncIterator, Iterator

import pytest
from PIL import Image
from pydantic import ValidationError

from image_server.errors import (
    ContentPolicy,
    GenerationFailed,
    InvalidRequest,
    RateLimited,
    Unsupported,
)
from image_server.generators import ReferenceImage, RenderJob, validate_generator_config
from image_server.generators.leonardo import LeonardoConfig, LeonardoGenerator
from schemas import LoraSpec, RenderRequest
from tests.fakes.images import solid_bytes
from tests.fakes.leonardo import FakeLeonardo

KEY = "5f0c6a2e-PLANTED-leonardo-key-0001"
ELEMENT = "b1a2c3d4-0000-4000-8000-000000000001"
DEADLINE = 5.0


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLeonardo]:
    with FakeLeonardo(api_key=KEY) as fake:
        yield fake


@pytest.fixture
def fake(server: FakeLeonardo) -> FakeLeonardo:
    server.reset()
    return server


def make(fake: FakeLeonardo, environ: dict[str, str] | None = None, **fields) -> LeonardoGenerator:
    config = LeonardoConfig(base_url=fake.base_url, poll_interval_s=0.01, poll_max_interval_s=0.02, **fields)
    return LeonardoGenerator(config, name="leo", environ=fake.environ if environ is None else environ)


@pytest.fixture
async def gen(fake: FakeLeonardo) -> AsyncIterator[LeonardoGenerator]:
    async with make(fake) as generator:
        assert isinstance(generator, LeonardoGenerator)
        yield generator


def job(prompt: str = "a lighthouse at dusk", references: list[ReferenceImage] | None = None, **fields) -> RenderJob:
    return RenderJob(request=RenderRequest(request_id="r1", prompt=prompt, **fields), references=references or [])


def reference(fmt: str = "png") -> ReferenceImage:
    return ReferenceImage(solid_bytes((9, 9, 200), (16, 16), fmt), fmt, 16, 16)


async def test_text_to_image_creates_polls_and_downloads(fake: FakeLeonardo, gen: LeonardoGenerator) -> None:
    fake.pending_polls = 2
    render = job(width=1000, height=600, seed=5, steps=80, guidance_scale=7.4, negative_prompt="fog", num_images=2)
    seen: list[tuple[float | None, str | None]] = []
    render.progress = lambda fraction, message: seen.append((fraction, message))
    result = await gen.generate(render)

    (create,) = fake.calls("POST", "/generations")
    assert create.headers["authorization"] == f"Bearer {KEY}"
    assert create.json() == {
        "prompt": "a lighthouse at dusk",
        "num_images": 2,
        "public": False,
        "modelId": "b24e16ff-06e3-43eb-8d33-4416c2d75876",
        "width": 1000,
        "height": 600,
        "negative_prompt": "fog",
        "num_inference_steps": 60,  # clamped into 10..60
        "guidance_scale": 7,  # an integer 1..20
        "seed": 5,
    }
    assert len(fake.calls("GET", "/generations/")) == 3  # PENDING twice, then COMPLETE
    assert seen == [(None, "pending at Leonardo")]
    assert [image.format for image in result.images] == ["jpeg", "jpeg"]
    assert Image.open(io.BytesIO(result.images[0].data or b"")).size == (8, 8)
    cdn = [r for r in fake.requests if r.path.startswith("/cdn/")]
    assert len(cdn) == 2 and all("authorization" not in {k.lower() for k in r.headers} for r in cdn)
    assert result.applied["steps"] == 60 and result.applied["guidance_scale"] == 7
    assert result.applied["width"] == 1000 and result.applied["seed"] == 5
    assert result.ignored == []


async def test_sizes_snap_to_multiples_of_8(fake: FakeLeonardo, gen: LeonardoGenerator) -> None:
    result = await gen.generate(job(width=1001, height=645))
    body = fake.calls("POST", "/generations")[0].json()
    assert (body["width"], body["height"]) == (1000, 648)
    assert (result.applied["width"], result.applied["height"]) == (1000, 648)


async def test_image_to_image_uploads_through_the_presigned_post(fake: FakeLeonardo, gen: LeonardoGenerator) -> None:
    result = await gen.generate(job(references=[reference("jpeg")], strength=0.7))

    (ask,) = fake.calls("POST", "/init-image")
    assert ask.json() == {"extension": "jpg"}
    ((fields, order, headers),) = fake.s3_posts
    (image,) = fake.init_images.values()
    assert {k: v[0] for k, v in fields.items()} == image.fields  # every field exactly as returned
    assert order[-1] == "file" and "authorization" not in {k.lower() for k in headers}
    body = fake.calls("POST", "/generations")[0].json()
    assert body["init_image_id"] == image.id
    assert body["init_strength"] == 0.3  # ours: 0.7 of change; Leonardo's: 0.3 of likeness
    assert result.applied["init_strength"] == 0.3 and result.applied["init_image"] == "uploaded"
    async with asyncio.timeout(DEADLINE):  # the used init image is deleted in the background
        while not image.deleted:
            await asyncio.sleep(0.01)


async def test_preset_style_from_request_or_config(fake: FakeLeonardo) -> None:
    async with make(fake, preset_style="CINEMATIC", alchemy=True) as gen:
        styled = await gen.generate(job(style="anime"))
        unknown = await gen.generate(job(style="watercolour"))
    bodies = [r.json() for r in fake.calls("POST", "/generations")]
    assert [b["presetStyle"] for b in bodies] == ["ANIME", "CINEMATIC"]
    assert bodies[0]["alchemy"] is True
    assert styled.ignored == [] and unknown.ignored == ["style"]
    assert unknown.applied["preset_style"] == "CINEMATIC"


async def test_loras_become_elements(fake: FakeLeonardo, gen: LeonardoGenerator) -> None:
    result = await gen.generate(job(loras=[LoraSpec(name=ELEMENT, strength=0.6)]))
    assert fake.calls("POST", "/generations")[0].json()["elements"] == [{"akUUID": ELEMENT, "weight": 0.6}]
    assert result.applied["elements"] == [{"akUUID": ELEMENT, "weight": 0.6}]
    with pytest.raises(InvalidRequest, match="Element ids"):
        await gen.generate(job(loras=[LoraSpec(name="https://example.com/lora.safetensors")]))


async def test_too_many_large_images_are_refused_before_any_call(fake: FakeLeonardo, gen) -> None:
    with pytest.raises(Unsupported, match="at most 4 images"):
        await gen.generate(job(width=1024, height=1024, num_images=5))
    assert fake.requests == []


async def test_nsfw_flag_is_content_policy(fake: FakeLeonardo, gen: LeonardoGenerator) -> None:
    fake.scenario = "nsfw"
    with pytest.raises(ContentPolicy, match="NSFW") as caught:
        await gen.generate(job(num_images=2))
    assert caught.value.request_id == "r1" and not caught.value.retryable


async def test_nsfw_allowed_when_configured(fake: FakeLeonardo) -> None:
    fake.scenario = "nsfw"
    async with make(fake, refuse_nsfw=False) as gen:
        result = await gen.generate(job())
    assert len(result.images) == 1


@pytest.mark.parametrize(
    ("scenario", "error", "retryable", "words"),
    [
        ("failed", GenerationFailed, False, "FAILED"),
        ("lost", GenerationFailed, False, "no longer knows"),
        ("rate_limited", RateLimited, True, "Too many requests"),
        ("moderation", ContentPolicy, False, "moderation"),
        ("echo_key", GenerationFailed, True, "***"),
        ("malformed", GenerationFailed, False, "unexpected answer"),
    ],
)
async def test_failures_map_to_our_errors(fake, gen, scenario, error, retryable, words) -> None:
    fake.scenario = scenario
    with pytest.raises(error) as caught:
        await gen.generate(job())
    assert type(caught.value) is error and caught.value.retryable is retryable
    assert words in str(caught.value) and KEY not in str(caught.value)
    if scenario == "rate_limited":
        assert caught.value.retry_after == 4.0


async def test_failed_polls_are_waited_out_up_to_a_limit(fake: FakeLeonardo) -> None:
    """A poll is free and the generation runs on: a passing 503 must not cost a second generation."""
    fake.failing_polls = 2
    async with make(fake, poll_failures_tolerated=2) as gen:
        result = await gen.generate(job())
        assert len(result.images) == 1 and len(fake.generations) == 1
        fake.failing_polls = 3
        with pytest.raises(GenerationFailed, match="HTTP 503") as caught:
            await gen.generate(job())
    assert caught.value.retryable and len(fake.generations) == 2


async def test_a_wrong_key_is_an_authentication_failure(fake: FakeLeonardo) -> None:
    async with make(fake, environ={"LEONARDO_API_KEY": "not-the-key"}) as gen:
        with pytest.raises(GenerationFailed, match="authentication failed") as caught:
            await gen.generate(job())
        health = await gen.health()
    assert caught.value.status == 401 and not caught.value.retryable
    assert not health.ok and "authentication failed" in health.detail


async def test_health_calls_me(fake: FakeLeonardo, gen: LeonardoGenerator) -> None:
    report = await gen.health()
    assert report.ok, report.detail
    assert [r.path for r in fake.requests] == ["/api/rest/v1/me"]


async def test_a_cancelled_render_deletes_its_generation(fake: FakeLeonardo, gen: LeonardoGenerator) -> None:
    fake.scenario = "hang"
    task = asyncio.ensure_future(gen.generate(job()))
    async with asyncio.timeout(DEADLINE):
        while not fake.calls("GET", "/generations/"):
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (generation,) = fake.generations.values()
    async with asyncio.timeout(DEADLINE):
        while not generation.deleted:
            await asyncio.sleep(0.01)
    assert fake.calls("DELETE", "/generations/")[0].headers["authorization"] == f"Bearer {KEY}"


async def test_a_render_cancelled_mid_create_still_deletes_the_generation(fake: FakeLeonardo, gen) -> None:
    gate = fake.create_gate = threading.Event()
    task = asyncio.ensure_future(gen.generate(job()))
    try:
        async with asyncio.timeout(DEADLINE):
            await asyncio.to_thread(fake.create_started.wait, DEADLINE)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        gate.set()  # Leonardo answers after all: the generation exists, and is paid for
    async with asyncio.timeout(DEADLINE):
        while not (fake.generations and all(g.deleted for g in fake.generations.values())):
            await asyncio.sleep(0.01)
    assert not fake.calls("GET", "/generations/")


async def test_delivery_url_hands_leonardos_urls_on(fake: FakeLeonardo, gen: LeonardoGenerator) -> None:
    result = await gen.generate(job(delivery="url"))
    (generation,) = fake.generations.values()
    assert [image.url for image in result.images] == generation.urls
    assert not [r for r in fake.requests if r.path.startswith("/cdn/")]


def test_config_is_validated() -> None:
    table = {"strategy": "leonardo", "width": 1000, "preset_style": "CINEMATIC"}
    assert isinstance(validate_generator_config("leo", table), LeonardoConfig)
    for bad in ({"width": 1001}, {"preset_style": "cinematic-ish"}, {"arguments": {"prompt": "x"}}, {"model_id": "x"}):
        with pytest.raises((ValidationError, ValueError)):
            LeonardoConfig(**bad)
