"""GeminiGenerator against a local fake of the generateContent API."""

from __future__ import annotations

import base64
import io
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from PIL import Image
from pydantic import ValidationError

from image_server.errors import (
    ContentPolicy,
    GenerationFailed,
    GenerationTimeout,
    GeneratorUnavailable,
    RateLimited,
    Unsupported,
)
from image_server.generators import ReferenceImage, RenderJob, check_request, validate_generator_config
from image_server.generators.gemini import GeminiConfig, GeminiGenerator
from image_server.generators.gemini.config import nearest_aspect_ratio
from schemas import RenderRequest
from tests.fakes.gemini import FakeGemini, iter_inline_images, tiny_image

PLANTED_KEY = "AIzaPLANTED-secret-0123456789"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeGemini]:
    with FakeGemini(api_key=PLANTED_KEY) as fake:
        yield fake


@pytest.fixture
def fake(server: FakeGemini) -> FakeGemini:
    server.reset()
    return server


def make(fake: FakeGemini, **fields) -> GeminiGenerator:
    return GeminiGenerator(GeminiConfig(base_url=fake.url, **fields), name="gem", environ=fake.environ)


@pytest.fixture
async def gen(fake: FakeGemini) -> AsyncIterator[GeminiGenerator]:
    async with make(fake) as generator:
        assert isinstance(generator, GeminiGenerator)
        yield generator


def job(prompt: str = "a red fox in snow", references: list[ReferenceImage] | None = None, **fields) -> RenderJob:
    return RenderJob(request=RenderRequest(request_id="r1", prompt=prompt, **fields), references=references or [])


def reference(fmt: str) -> ReferenceImage:
    return ReferenceImage(data=tiny_image(fmt, (16, 12)), format=fmt, width=16, height=12)


def headers_of(request) -> dict[str, str]:
    return {key.lower(): value for key, value in request.headers.items()}


async def test_text_to_image_sends_the_contract_request(fake: FakeGemini, gen: GeminiGenerator) -> None:
    result = await gen.generate(job(width=1344, height=768, seed=5, negative_prompt="blur"))

    (sent,) = fake.requests
    assert (sent.method, sent.path) == ("POST", "/v1beta/models/gemini-2.5-flash-image:generateContent")
    assert headers_of(sent)["x-goog-api-key"] == PLANTED_KEY
    assert headers_of(sent)["content-type"] == "application/json"
    assert sent.json() == {
        "contents": [{"role": "user", "parts": [{"text": "a red fox in snow"}]}],
        "generationConfig": {"responseModalities": ["TEXT", "IMAGE"], "imageConfig": {"aspectRatio": "16:9"}},
    }
    (image,) = result.images
    assert image.format == "png"
    assert Image.open(io.BytesIO(image.data or b"")).size == (8, 8)
    assert result.applied == {"model": "gemini-2.5-flash-image", "aspect_ratio": "16:9"}
    assert result.ignored == ["seed", "negative_prompt"]
    assert result.prompt == "a red fox in snow"


async def test_no_size_leaves_the_aspect_ratio_to_the_model(fake: FakeGemini, gen: GeminiGenerator) -> None:
    fake.image_format = "jpeg"
    result = await gen.generate(job())
    assert "imageConfig" not in fake.requests[0].json()["generationConfig"]
    assert result.applied["aspect_ratio"] == "model default"
    assert result.images[0].format == "jpeg"


async def test_image_only_and_image_size_settings(fake: FakeGemini) -> None:
    async with make(fake, image_only=True, image_size="2K", model="gemini-3-pro-image-preview") as generator:
        fake.models.add("gemini-3-pro-image-preview")
        result = await generator.generate(job(width=900, height=1600))
    sent = fake.requests[-1]
    assert sent.path == "/v1beta/models/gemini-3-pro-image-preview:generateContent"
    assert sent.json()["generationConfig"] == {
        "responseModalities": ["IMAGE"],
        "imageConfig": {"aspectRatio": "9:16", "imageSize": "2K"},
    }
    assert result.applied == {"model": "gemini-3-pro-image-preview", "aspect_ratio": "9:16", "image_size": "2K"}


@pytest.mark.parametrize(
    ("width", "height", "ratio"),
    [(1024, 1024, "1:1"), (1920, 1080, "16:9"), (1080, 1920, "9:16"), (2560, 1080, "21:9"), (1000, 800, "5:4"),
     (800, 1200, "2:3"), (1200, 900, "4:3"), (4096, 64, "21:9")],
)  # fmt: skip
def test_nearest_aspect_ratio(width: int, height: int, ratio: str) -> None:
    assert nearest_aspect_ratio(width, height) == ratio


async def test_image_to_image_sends_references_inline(fake: FakeGemini, gen: GeminiGenerator) -> None:
    refs = [reference("png"), reference("jpeg")]
    result = await gen.generate(job("make it night", refs))

    parts = fake.requests[0].json()["contents"][0]["parts"]
    assert parts[0] == {"text": "make it night"}
    assert list(iter_inline_images(fake.requests[0])) == [("image/png", refs[0].data), ("image/jpeg", refs[1].data)]
    assert fake.image_parts_seen == [2]
    assert result.applied["reference_images"] == 2


async def test_too_many_references_are_refused_before_any_call(fake: FakeGemini) -> None:
    async with make(fake, max_reference_images=1) as gen:
        assert gen.capabilities.max_reference_images == 1
        source = {"image_data": base64.b64encode(tiny_image()).decode()}
        request = RenderRequest(request_id="r2", prompt="x", reference_images=[source, source])
        with pytest.raises(Unsupported):
            check_request(gen.capabilities, request, "gem")
        with pytest.raises(Unsupported):
            await gen.generate(RenderJob(request=request, references=[reference("png")] * 2))
    assert fake.requests == []


async def test_text_parts_are_ignored_when_an_image_comes_back(fake: FakeGemini, gen: GeminiGenerator) -> None:
    fake.text = "Sure! Here is a fox."
    result = await gen.generate(job())
    assert len(result.images) == 1 and result.images[0].format == "png"


@pytest.mark.parametrize(
    ("scenario", "error", "retryable", "status", "error_type"),
    [
        ("rate_limit", RateLimited, True, 429, "RESOURCE_EXHAUSTED"),
        ("unavailable", GenerationFailed, True, 503, "UNAVAILABLE"),
        ("internal", GenerationFailed, True, 500, "INTERNAL"),
        ("forbidden", GenerationFailed, False, 403, "PERMISSION_DENIED"),
        ("malformed", GenerationFailed, False, None, None),
        ("bad_base64", GenerationFailed, False, None, None),
        ("text_only", GenerationFailed, False, None, "STOP"),
    ],
)
async def test_errors_map_to_classes(fake, gen, scenario, error, retryable, status, error_type) -> None:
    fake.scenario = scenario
    with pytest.raises(GenerationFailed) as info:
        await gen.generate(job())
    assert type(info.value) is error
    assert (info.value.retryable, info.value.status, info.value.error_type) == (retryable, status, error_type)
    assert (info.value.request_id, info.value.generator) == ("r1", "gem")


async def test_invalid_key_is_an_auth_failure_not_retried(fake: FakeGemini) -> None:
    generator = GeminiGenerator(GeminiConfig(base_url=fake.url), environ={"GEMINI_API_KEY": "wrong-key"})
    async with generator:
        with pytest.raises(GenerationFailed) as info:
            await generator.generate(job())
    assert type(info.value) is GenerationFailed
    assert (info.value.status, info.value.retryable, info.value.error_type) == (400, False, "API_KEY_INVALID")
    assert "authentication failed" in str(info.value)


async def test_unknown_model_is_not_retried(fake: FakeGemini) -> None:
    async with make(fake, model="gemini-9-nonexistent") as generator:
        with pytest.raises(GenerationFailed) as info:
            await generator.generate(job())
    assert (info.value.status, info.value.retryable, info.value.error_type) == (404, False, "NOT_FOUND")


async def test_retry_after_comes_from_header_or_retry_info(fake: FakeGemini, gen: GeminiGenerator) -> None:
    fake.scenario = "rate_limit"
    with pytest.raises(RateLimited) as info:
        await gen.generate(job())
    assert info.value.retry_after == 7.0
    fake.retry_after, fake.retry_delay = None, "2.5s"
    with pytest.raises(RateLimited) as info:
        await gen.generate(job())
    assert info.value.retry_after == 2.5


async def test_blocked_prompt_is_content_policy(fake: FakeGemini, gen: GeminiGenerator) -> None:
    fake.scenario, fake.block_reason = "prompt_block", "PROHIBITED_CONTENT"
    with pytest.raises(ContentPolicy) as info:
        await gen.generate(job())
    assert (info.value.error_type, info.value.retryable) == ("PROHIBITED_CONTENT", False)
    assert "prompt was blocked" in str(info.value)


@pytest.mark.parametrize("reason", ["IMAGE_SAFETY", "SAFETY", "PROHIBITED_CONTENT"])
async def test_blocked_image_is_content_policy(fake: FakeGemini, gen: GeminiGenerator, reason: str) -> None:
    fake.scenario, fake.finish_reason = "image_block", reason
    with pytest.raises(ContentPolicy) as info:
        await gen.generate(job())
    assert (info.value.error_type, info.value.retryable, info.value.code) == (reason, False, "content_policy")
    assert "image was blocked" in str(info.value)


async def test_no_image_without_block_reason_says_so(fake: FakeGemini, gen: GeminiGenerator) -> None:
    fake.scenario, fake.text = "text_only", "I would rather describe it."
    with pytest.raises(GenerationFailed) as info:
        await gen.generate(job())
    assert not isinstance(info.value, ContentPolicy)
    assert "no image" in str(info.value) and "I would rather describe it." in str(info.value)


async def test_key_never_appears_in_errors_or_logs(fake, gen, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    fake.scenario = "echo_key"
    with pytest.raises(GenerationFailed) as info:
        await gen.generate(job())
    assert fake.requests[-1].path.endswith(":generateContent")  # the key went in a header, not the URL
    assert "bad key ***" in str(info.value)
    for text in (str(info.value), repr(info.value), *map(str, info.value.args), caplog.text):
        assert PLANTED_KEY not in text


async def test_slow_provider_times_out(fake: FakeGemini) -> None:
    fake.scenario = "slow"
    async with make(fake, request_timeout_s=0.2) as generator:
        started = time.monotonic()
        with pytest.raises(GenerationTimeout) as info:
            await generator.generate(job())
    assert time.monotonic() - started < 2
    assert info.value.retryable and info.value.request_id == "r1"


async def test_connection_refused_is_retryable() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    generator = GeminiGenerator(
        GeminiConfig(base_url=f"http://127.0.0.1:{port}"), environ={"GEMINI_API_KEY": PLANTED_KEY}
    )
    async with generator:
        with pytest.raises(GenerationFailed) as info:
            await generator.generate(job())
    assert info.value.retryable and PLANTED_KEY not in str(info.value)


async def test_health_ok_and_failures(fake: FakeGemini, gen: GeminiGenerator) -> None:
    report = await gen.health()
    assert report.ok, report.detail
    assert (fake.requests[-1].method, fake.requests[-1].path) == ("GET", "/v1beta/models/gemini-2.5-flash-image")
    assert headers_of(fake.requests[-1])["x-goog-api-key"] == PLANTED_KEY

    async with GeminiGenerator(GeminiConfig(base_url=fake.url), environ={"GEMINI_API_KEY": "nope"}) as bad_key:
        report = await bad_key.health()
    assert not report.ok and "API_KEY_INVALID" in report.detail

    async with make(fake, model="gemini-0-missing") as missing:
        report = await missing.health()
    assert not report.ok and "NOT_FOUND" in report.detail


async def test_missing_key_is_unavailable(fake: FakeGemini) -> None:
    generator = GeminiGenerator(GeminiConfig(base_url=fake.url, api_key_env="MY_GEMINI_KEY"), environ={})
    report = await generator.health()
    assert not report.ok and "MY_GEMINI_KEY" in report.detail
    with pytest.raises(GeneratorUnavailable, match="MY_GEMINI_KEY"):
        await generator.open()


async def test_overrides_are_limited_to_model_knobs(fake: FakeGemini) -> None:
    assert GeminiConfig.OVERRIDABLE == frozenset({"aspect_ratio", "image_size"})
    # What the manager does with generator_config={"aspect_ratio": "3:4"}:
    config = GeminiConfig.model_validate({**GeminiConfig(base_url=fake.url).model_dump(), "aspect_ratio": "3:4"})
    async with GeminiGenerator(config, environ=fake.environ) as generator:
        result = await generator.generate(job(width=1920, height=1080))  # the configured ratio wins
    assert fake.requests[-1].json()["generationConfig"]["imageConfig"] == {"aspectRatio": "3:4"}
    assert result.applied["aspect_ratio"] == "3:4"


def test_config_validation_and_registry() -> None:
    config = validate_generator_config("gem", {"strategy": "gemini", "image_size": "2K"})
    assert isinstance(config, GeminiConfig) and config.model == "gemini-2.5-flash-image"
    for bad in ({"model": "../../other"}, {"base_url": "ftp://x"}, {"image_only": "sometimes"}):
        with pytest.raises(ValidationError):
            GeminiConfig(**bad)
    assert GeminiGenerator(GeminiConfig()).capabilities.parameters == frozenset()


async def test_lifecycle(fake: FakeGemini) -> None:
    generator = make(fake)
    with pytest.raises(RuntimeError, match="not open"):
        await generator.generate(job())
    await generator.open()
    await generator.aclose()
    await generator.aclose()
    assert not (await generator.health()).ok


# -- the fake refuses what the real endpoint refuses --------------------------------------------


@pytest.mark.parametrize(
    ("generation_config", "ok", "words"),
    [
        ({"responseModalities": ["TEXT", "IMAGE"], "imageConfig": {"aspectRatio": "16:9"}}, True, ""),
        ({"response_modalities": ["IMAGE"], "image_config": {"aspect_ratio": "1:1", "image_size": "2K"}}, True, ""),
        ({"responseModalities": ["PICTURE"]}, False, "response_modalities[0]"),
        ({"imageConfig": {"aspectRatio": "7:5"}}, False, "aspect ratio"),
        ({"imageConfig": {"imageSize": "8K"}}, False, "image size"),
        ({"imageConfig": {"resolution": "1K"}}, False, 'Unknown name "resolution"'),
        ({"seed": 3, "negativePrompt": "fog"}, False, 'Unknown name "negativePrompt"'),
    ],
)
async def test_fake_refuses_generation_config_it_does_not_know(fake, generation_config, ok, words) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "a fox"}]}], "generationConfig": generation_config}
    url = f"{fake.url}/v1beta/models/gemini-2.5-flash-image:generateContent"
    async with httpx.AsyncClient() as client:
        response = await client.post(url, json=body, headers={"x-goog-api-key": PLANTED_KEY})
    if ok:
        assert response.status_code == 200, response.text
    else:
        error = response.json()["error"]
        assert response.status_code == 400 and error["status"] == "INVALID_ARGUMENT" and words in error["message"]
