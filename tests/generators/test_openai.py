"""OpenAIGenerator against the strict fake OpenAI Images server in tests/fakes/openai.py."""

from __future__ import annotations

import asyncio
import io
import logging
import socket
from collections.abc import Iterator
from datetime import date
from typing import Any

import httpx
import pytest
from hypothesis import given, strategies as st
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
from image_server.generators import check_request, get_generator_class, validate_generator_config
from image_server.generators.base import ReferenceImage, RenderJob
from image_server.generators.openai import OpenAIConfig, OpenAIGenerator
from image_server.generators.openai.config import nearest_size
from image_server.manager import GeneratorManager
from schemas import RenderRequest
from tests.fakes.openai import (
    FakeOpenAI,
    ScriptedError,
    content_policy_violation,
    fake_openai,
    insufficient_quota,
    invalid_request,
    moderation_blocked,
    rate_limited,
    server_error,
)

PLANTED_KEY = "sk-planted-secret-key-4f9a1c2e7b"
# dall-e-3 was shut down on 2026-05-12; its tests run against OpenAI as it was the week before.
BEFORE_DALLE_SHUTDOWN = date(2026, 5, 5)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAI]:
    with fake_openai(api_key=PLANTED_KEY) as fake:
        yield fake


@pytest.fixture
def fake(server: FakeOpenAI) -> Iterator[FakeOpenAI]:
    server.reset()
    yield server
    server.reset()


def make_generator(fake: FakeOpenAI, *, key: str = PLANTED_KEY, **config: Any) -> OpenAIGenerator:
    settings = OpenAIConfig(base_url=fake.base_url, **config)
    return OpenAIGenerator(settings, name="openai", environ={"OPENAI_API_KEY": key})


def make_job(references: list[ReferenceImage] | None = None, **fields: Any) -> RenderJob:
    fields.setdefault("prompt", "a lighthouse at dusk")
    return RenderJob(RenderRequest(request_id="req-1", **fields), references=references or [])


def reference(width: int, height: int, fmt: str = "png") -> ReferenceImage:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format=fmt.upper())
    return ReferenceImage(data=buffer.getvalue(), format=fmt, width=width, height=height)


async def generate(fake: FakeOpenAI, job: RenderJob, **config: Any) -> Any:
    async with make_generator(fake, **config) as generator:
        async with asyncio.timeout(5):
            return await generator.generate(job)


def assert_no_key(exc: BaseException) -> None:
    for text in (str(exc), repr(exc), *map(str, exc.args)):
        assert PLANTED_KEY not in text


# -- generations ------------------------------------------------------------------------


async def test_gpt_image_generation_sends_exact_json(fake):
    job = make_job(width=1024, height=1536, num_images=2)
    result = await generate(fake, job, quality="high", background="opaque", moderation="low")

    [call] = fake.api_requests("/v1/images/generations")
    assert call.json() == {
        "model": "gpt-image-2",
        "prompt": "a lighthouse at dusk",
        "n": 2,
        "size": "1024x1536",
        "quality": "high",
        "output_format": "png",
        "background": "opaque",
        "moderation": "low",
    }
    assert call.headers["authorization"] == f"Bearer {PLANTED_KEY}"
    assert [(i.format, i.width, i.height) for i in result.images] == [("png", 8, 12), ("png", 8, 12)]
    assert result.images[0].data != result.images[1].data  # both images, in order
    assert result.applied == {
        "model": "gpt-image-2",
        "size": "1024x1536",
        "quality": "high",
        "output_format": "png",
        "background": "opaque",
        "moderation": "low",
    }
    assert result.prompt == "a lighthouse at dusk"
    assert result.ignored == []


async def test_gpt_image_asks_for_the_requested_output_format(fake):
    fake.today = date(2026, 11, 30)  # gpt-image-1.5 shuts down on 2026-12-01
    result = await generate(fake, make_job(output_format="jpeg"), model="gpt-image-1.5", output_compression=70)

    [call] = fake.api_requests("/v1/images/generations")
    assert call.json()["output_format"] == "jpeg"
    assert call.json()["output_compression"] == 70
    assert "response_format" not in call.json()
    assert result.images[0].format == "jpeg"


async def test_transparent_background_never_asks_for_jpeg(fake):
    await generate(fake, make_job(output_format="jpeg"), background="transparent")

    [call] = fake.api_requests("/v1/images/generations")
    assert (call.json()["output_format"], call.json()["background"]) == ("png", "transparent")


async def test_dalle3_generation_asks_for_base64(fake):
    fake.today = BEFORE_DALLE_SHUTDOWN
    job = make_job(width=1920, height=1080, style="natural")
    result = await generate(fake, job, model="dall-e-3", quality="hd")

    [call] = fake.api_requests("/v1/images/generations")
    assert call.json() == {
        "model": "dall-e-3",
        "prompt": "a lighthouse at dusk",
        "n": 1,
        "size": "1792x1024",
        "quality": "hd",
        "style": "natural",
        "response_format": "b64_json",
    }
    [image] = result.images
    assert (image.format, image.width, image.height) == ("png", 14, 8)
    assert result.applied["revised_prompt"] == "A detailed rendering of a lighthouse at dusk"
    assert result.applied["width"] == 1792 and result.applied["height"] == 1024
    assert result.ignored == []


async def test_dalle3_url_delivery_passes_the_url_on(fake):
    fake.today = BEFORE_DALLE_SHUTDOWN
    result = await generate(fake, make_job(delivery="url"), model="dall-e-3")

    [call] = fake.api_requests("/v1/images/generations")
    assert call.json()["response_format"] == "url"
    [image] = result.images
    assert image.data is None and image.url is not None and image.url.startswith(f"{fake.url}/files/")
    assert (image.width, image.height) == (1024, 1024)


async def test_dalle3_url_answer_is_downloaded_without_the_key(fake):
    fake.today = BEFORE_DALLE_SHUTDOWN
    fake.answer_with_url = True
    result = await generate(fake, make_job(), model="dall-e-3")

    [image] = result.images
    assert image.url is None and image.data is not None and image.data.startswith(b"\x89PNG")
    [download] = [r for r in fake.requests if r.path.startswith("/files/")]
    assert "authorization" not in download.headers


async def test_dalle3_style_it_cannot_take_is_reported_ignored(fake):
    fake.today = BEFORE_DALLE_SHUTDOWN
    result = await generate(fake, make_job(style="watercolor"), model="dall-e-3", style="vivid")

    [call] = fake.api_requests("/v1/images/generations")
    assert call.json()["style"] == "vivid"  # the configured default, not the request's
    assert result.ignored == ["style"]


async def test_dalle3_capabilities_refuse_what_it_cannot_do(fake):
    generator = make_generator(fake, model="dall-e-3")
    caps = generator.capabilities
    assert (caps.max_images, caps.image_to_image, caps.max_prompt_chars) == (1, False, 4000)
    with pytest.raises(Unsupported):
        check_request(caps, make_job(num_images=2).request, "openai")
    async with generator:
        with pytest.raises(Unsupported):
            await generator.generate(make_job([reference(64, 64)], reference_image={"uri": "file:///x.png"}))
    assert fake.requests == []


async def test_parameters_openai_lacks_are_listed_as_ignored(fake):
    job = make_job(seed=7, negative_prompt="fog", steps=30, guidance_scale=5.0, strength=0.5, style="noir")
    generator = make_generator(fake)
    assert check_request(generator.capabilities, job.request, "openai") == [
        "seed",
        "negative_prompt",
        "steps",
        "guidance_scale",
        "strength",
        "style",
    ]
    await generate(fake, job)
    [call] = fake.api_requests("/v1/images/generations")
    assert not {"seed", "negative_prompt", "steps", "guidance_scale", "strength", "style"} & set(call.json())


# -- edits ------------------------------------------------------------------------------


async def test_edit_with_one_reference_uses_the_image_field(fake):
    fake.today = date(2026, 11, 30)  # gpt-image-1.5 shuts down on 2026-12-01
    ref = reference(300, 200)
    job = make_job([ref], reference_image={"uri": "file:///ref.png"})
    result = await generate(fake, job, model="gpt-image-1.5", input_fidelity="high", moderation="low")

    [call] = fake.api_requests("/v1/images/edits")
    assert call.form == {
        "model": ["gpt-image-1.5"],
        "prompt": ["a lighthouse at dusk"],
        "n": ["1"],
        "size": ["1536x1024"],  # from the reference's landscape shape
        "output_format": ["png"],
        "input_fidelity": ["high"],
    }
    [upload] = call.files
    assert (upload.field, upload.filename, upload.content_type, upload.data) == (
        "image",
        "reference-0.png",
        "image/png",
        ref.data,
    )
    assert result.images[0].width == 12
    assert "width" not in result.applied


async def test_edit_with_several_references_uses_repeated_image_array_fields(fake):
    fake.today = date(2026, 11, 30)  # gpt-image-1-mini shuts down on 2026-12-01
    refs = [reference(64, 64, "png"), reference(64, 96, "jpeg"), reference(96, 64, "webp")]
    sources = [{"uri": f"file:///ref{i}"} for i in range(3)]
    await generate(fake, make_job(refs, reference_images=sources, width=1024, height=1024), model="gpt-image-1-mini")

    [call] = fake.api_requests("/v1/images/edits")
    assert [(f.field, f.filename, f.content_type) for f in call.files] == [
        ("image[]", "reference-0.png", "image/png"),
        ("image[]", "reference-1.jpg", "image/jpeg"),
        ("image[]", "reference-2.webp", "image/webp"),
    ]
    assert [f.data for f in call.files] == [r.data for r in refs]
    assert call.form["model"] == ["gpt-image-1-mini"] and call.form["size"] == ["1024x1024"]


# -- sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "width", "height", "expected"),
    [
        ("gpt-image-1", 1024, 1024, "1024x1024"),
        ("gpt-image-1", 512, 512, "1024x1024"),
        ("gpt-image-1", 1920, 1080, "1536x1024"),
        ("gpt-image-1", 600, 1000, "1024x1536"),
        ("gpt-image-1", 1100, 1000, "1024x1024"),
        ("dall-e-3", 1920, 1080, "1792x1024"),
        ("dall-e-3", 1080, 1920, "1024x1792"),
        ("dall-e-3", 640, 640, "1024x1024"),
        ("gpt-image-2", 1920, 1080, "1920x1088"),
        ("gpt-image-2", 4096, 4096, "2880x2880"),
        ("gpt-image-2", 4096, 64, "864x288"),
        ("gpt-image-2", 3840, 2160, "3840x2160"),
    ],
)
def test_nearest_size(model, width, height, expected):
    assert nearest_size(model, width, height) == expected


@given(st.integers(64, 4096), st.integers(64, 4096))
def test_gpt_image_2_sizes_always_fit_its_rules(width, height):
    w, h = map(int, nearest_size("gpt-image-2", width, height).split("x"))
    assert w % 16 == 0 and h % 16 == 0
    assert max(w, h) <= 3840 and w * h <= 3840 * 2160 and max(w / h, h / w) <= 3
    assert (w >= h) == (width >= height) or abs(w - h) <= 16  # orientation is kept


async def test_size_change_is_reported_in_applied(fake):
    result = await generate(fake, make_job(width=1920, height=1080))  # gpt-image-2: multiples of 16
    assert (result.applied["size"], result.applied["height"]) == ("1920x1088", 1088) and "width" not in result.applied


async def test_configured_size_is_the_default(fake):
    result = await generate(fake, make_job(), size="auto")
    [call] = fake.api_requests("/v1/images/generations")
    assert call.json()["size"] == "auto" and result.applied["size"] == "auto"


# -- config -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"model": "dall-e-3", "quality": "high"},
        {"model": "gpt-image-1", "quality": "hd"},
        {"model": "gpt-image-1", "style": "vivid"},
        {"model": "dall-e-3", "background": "transparent"},
        {"model": "gpt-image-1", "size": "1792x1024"},
        {"model": "gpt-image-2", "size": "1000x1000"},
        {"model": "dall-e-3", "size": "auto"},
        {"background": "transparent", "output_format": "jpeg"},
        {"base_url": "ftp://example.com"},
        {"api_key": "sk-inline"},
        {"model": "gpt-image-2", "input_fidelity": "low"},
        {"model": "gpt-image-1-mini", "input_fidelity": "high"},
        {"model": "dall-e-2", "style": "vivid"},
        {"model": "bad model name"},
    ],
)
def test_config_refuses_what_the_model_cannot_take(fields):
    with pytest.raises(ValidationError):
        OpenAIConfig(**fields)


def test_config_through_the_registry():
    assert get_generator_class("openai") is OpenAIGenerator
    config = validate_generator_config("openai_hd", {"strategy": "openai", "model": "gpt-image-2", "size": "1920x1088"})
    assert isinstance(config, OpenAIConfig) and config.base_url == "https://api.openai.com/v1"
    assert not {"model", "base_url", "api_key_env", "organization_env", "project_env"} & OpenAIConfig.OVERRIDABLE


# -- errors -----------------------------------------------------------------------------


NOT_FOUND = ScriptedError(404, "The model does not exist", "invalid_request_error", "model_not_found")
DO_NOT_RETRY = ScriptedError(500, "do not retry this one", "server_error", headers={"x-should-retry": "false"})


@pytest.mark.parametrize(
    ("error", "expected", "retryable", "retry_after"),
    [
        (invalid_request(), GenerationFailed, False, None),
        (moderation_blocked(), ContentPolicy, False, None),
        (content_policy_violation(), ContentPolicy, False, None),
        (content_policy_violation(null_code=True), ContentPolicy, False, None),
        (NOT_FOUND, GenerationFailed, False, None),
        (ScriptedError(403, "Project does not have access", "invalid_request_error"), GenerationFailed, False, None),
        (rate_limited("7"), RateLimited, True, 7.0),
        (rate_limited(None, retry_after_ms="1500"), RateLimited, True, 1.5),
        (insufficient_quota(), GenerationFailed, False, None),
        (server_error(500), GenerationFailed, True, None),
        (server_error(503), GenerationFailed, True, None),
        (DO_NOT_RETRY, GenerationFailed, False, None),
        (ScriptedError(409, "Another request holds the lock", "conflict"), GenerationFailed, True, None),
    ],
)
async def test_provider_errors_are_translated(fake, error, expected, retryable, retry_after):
    fake.fail_next(error)
    with pytest.raises(expected) as caught:
        await generate(fake, make_job())
    exc = caught.value
    assert type(exc) is expected
    assert (exc.retryable, exc.retry_after, exc.status) == (retryable, retry_after, error.status)
    assert error.message in str(exc) and "x-request-id req_" in str(exc)
    assert exc.generator == "openai"


async def test_bad_key_is_not_retryable_and_never_echoed(fake):
    with pytest.raises(GenerationFailed) as caught:
        await generate(fake, make_job(), key="sk-wrong-" + PLANTED_KEY)
    assert (caught.value.status, caught.value.retryable, caught.value.error_type) == (401, False, "invalid_api_key")
    assert "Incorrect API key provided: ***" in str(caught.value)
    assert_no_key(caught.value)


async def test_key_echoed_in_any_error_body_is_scrubbed(fake):
    fake.fail_next(ScriptedError(502, f"upstream saw Authorization: Bearer {PLANTED_KEY}", "server_error"))
    with pytest.raises(GenerationFailed) as caught:
        await generate(fake, make_job())
    assert caught.value.retryable and "Bearer ***" in str(caught.value)
    assert_no_key(caught.value)


async def test_slow_provider_times_out(fake):
    fake.delay_s = 5.0
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(GenerationTimeout) as caught:
        await generate(fake, make_job(), request_timeout_s=0.2)
    assert loop.time() - started < 2.0
    assert caught.value.retryable
    assert_no_key(caught.value)


async def test_unreachable_provider_is_retryable():
    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = OpenAIConfig(base_url=f"http://127.0.0.1:{port}/v1")
    generator = OpenAIGenerator(config, environ={"OPENAI_API_KEY": PLANTED_KEY})
    async with generator:
        with pytest.raises(GenerationFailed) as caught:
            await generator.generate(make_job())
        assert caught.value.retryable
        assert_no_key(caught.value)
        report = await generator.health()
    assert not report.ok and PLANTED_KEY not in report.detail


@pytest.mark.parametrize("malformed", ["json", "no_data", "bad_base64", "not_image"])
async def test_malformed_answers_fail_cleanly(fake, malformed):
    fake.malformed = malformed
    with pytest.raises(GenerationFailed) as caught:
        await generate(fake, make_job())
    assert type(caught.value) is GenerationFailed and not caught.value.retryable


# -- lifecycle and health ---------------------------------------------------------------


async def test_missing_key_makes_the_generator_unavailable(fake):
    generator = OpenAIGenerator(OpenAIConfig(base_url=fake.base_url, api_key_env="MY_OPENAI_KEY"), environ={})
    with pytest.raises(GeneratorUnavailable, match="MY_OPENAI_KEY"):
        await generator.open()


async def test_organization_and_project_headers(fake):
    config = OpenAIConfig(base_url=fake.base_url, organization_env="OPENAI_ORG_ID", project_env="OPENAI_PROJECT_ID")
    environ = {"OPENAI_API_KEY": PLANTED_KEY, "OPENAI_ORG_ID": "org-123", "OPENAI_PROJECT_ID": "proj_456"}
    async with OpenAIGenerator(config, environ=environ) as generator:
        await generator.generate(make_job())
    [call] = fake.api_requests("/v1/images/generations")
    assert (call.headers["openai-organization"], call.headers["openai-project"]) == ("org-123", "proj_456")
    with pytest.raises(GeneratorUnavailable, match="OPENAI_ORG_ID"):
        await OpenAIGenerator(config, environ={"OPENAI_API_KEY": PLANTED_KEY}).open()


async def test_generate_needs_open(fake):
    generator = make_generator(fake)
    with pytest.raises(RuntimeError, match="not open"):
        await generator.generate(make_job())
    assert not (await generator.health()).ok


async def test_health_ok(fake):
    async with make_generator(fake, model="gpt-image-2") as generator:
        report = await generator.health()
    assert report.ok and "gpt-image-2" in report.detail
    [call] = fake.api_requests("/v1/models/gpt-image-2")
    assert call.method == "GET" and call.headers["authorization"] == f"Bearer {PLANTED_KEY}"


async def test_health_reports_a_bad_key(fake):
    async with make_generator(fake, key="sk-bad-" + PLANTED_KEY) as generator:
        report = await generator.health()
    assert not report.ok and "401" in report.detail and PLANTED_KEY not in report.detail


async def test_aclose_is_idempotent_and_reopen_works(fake):
    generator = make_generator(fake)
    await generator.open()
    await generator.aclose()
    await generator.aclose()
    async with generator:
        assert len((await generator.generate(make_job())).images) == 1


# -- the fake itself is strict, so a wrong request cannot pass unnoticed ----------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/images/generations", {"model": "gpt-image-2", "prompt": "x", "response_format": "b64_json"}),
        ("/images/generations", {"model": "dall-e-3", "prompt": "x", "n": 2}),
        ("/images/generations", {"model": "gpt-image-1.5", "prompt": "x", "size": "1792x1024"}),
        ("/images/generations", {"model": "gpt-image-2", "prompt": "x", "seed": 1}),
        ("/images/edits", {"model": "gpt-image-2", "prompt": "x"}),
    ],
)
async def test_fake_refuses_requests_the_real_api_refuses(fake, path, body):
    fake.today = BEFORE_DALLE_SHUTDOWN
    async with httpx.AsyncClient(base_url=fake.base_url, headers={"Authorization": f"Bearer {PLANTED_KEY}"}) as client:
        response = await client.post(path, json=body)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


async def test_fake_refuses_dalle3_edits(fake):
    fake.today = BEFORE_DALLE_SHUTDOWN
    async with httpx.AsyncClient(base_url=fake.base_url, headers={"Authorization": f"Bearer {PLANTED_KEY}"}) as client:
        files = [("image", ("a.png", reference(64, 64).data, "image/png"))]
        response = await client.post("/images/edits", data={"model": "dall-e-3", "prompt": "x"}, files=files)
    assert response.status_code == 400 and "dall-e-3" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("model", "fidelity", "ok"),
    [
        ("gpt-image-1.5", "high", True),
        ("gpt-image-1-mini", "low", True),
        ("gpt-image-1-mini", "high", False),
        ("gpt-image-2", "low", False),
    ],
)
async def test_fake_takes_input_fidelity_only_where_openai_does(fake, model, fidelity, ok):
    fake.today = date(2026, 11, 30)
    async with httpx.AsyncClient(base_url=fake.base_url, headers={"Authorization": f"Bearer {PLANTED_KEY}"}) as client:
        files = [("image", ("a.png", reference(64, 64).data, "image/png"))]
        form = {"model": model, "prompt": "x", "input_fidelity": fidelity}
        response = await client.post("/images/edits", data=form, files=files)
    assert response.status_code == (200 if ok else 400), response.text


# -- models: a free string, a table of what is known, retirements ---------------------------------


@pytest.mark.parametrize("model", ["gpt-image-1", "dall-e-3", "dall-e-2"])
async def test_a_retired_model_is_refused_by_openai_and_named_in_the_error(fake, model):
    with pytest.raises(GenerationFailed) as caught:
        await generate(fake, make_job(), model=model)
    assert caught.value.status == 404 and not caught.value.retryable and model in str(caught.value)
    async with make_generator(fake, model=model) as generator:
        report = await generator.health()
    assert not report.ok and "model_not_found" in report.detail


async def test_the_default_model_is_current(fake):
    assert OpenAIConfig().model == "gpt-image-2"
    assert OpenAIConfig().startup_warnings() == []
    assert len((await generate(fake, make_job())).images) == 1


async def test_an_unknown_model_is_sent_with_the_generic_gpt_image_parameters(fake):
    fake.new_models = ("gpt-image-3",)
    job = make_job([reference(300, 200)], reference_image={"uri": "file:///ref.png"}, width=1920, height=1080)
    result = await generate(fake, job, model="gpt-image-3", quality="high", background="opaque")
    [call] = fake.api_requests("/v1/images/edits")
    assert call.form["model"] == ["gpt-image-3"] and call.form["size"] == ["1536x1024"]  # the generic sizes
    assert call.form["quality"] == ["high"] and call.form["background"] == ["opaque"]
    assert result.applied["model"] == "gpt-image-3"
    generator = make_generator(fake, model="gpt-image-3")
    assert generator.capabilities.max_reference_images == 16 and generator.config.startup_warnings() == []


@pytest.mark.parametrize(
    ("model", "today", "words"),
    [
        ("gpt-image-1", date(2026, 11, 30), "shut gpt-image-1 down on 2026-10-23"),
        ("dall-e-3", date(2026, 11, 30), "shut dall-e-3 down on 2026-05-12"),
        ("gpt-image-1-mini", date(2026, 11, 30), "shuts gpt-image-1-mini down on 2026-12-01"),
        ("gpt-image-1.5", date(2026, 12, 1), "shut gpt-image-1.5 down on 2026-12-01"),
    ],
)
def test_startup_warnings_for_retired_and_retiring_models(model, today, words):
    (warning,) = OpenAIConfig(model=model).startup_warnings(today)
    assert words in warning and "gpt-image-2" in warning


async def test_the_manager_logs_startup_warnings_when_it_opens(caplog):
    configs = {"old": OpenAIConfig(model="gpt-image-1"), "new": OpenAIConfig()}
    manager = GeneratorManager(configs, default="new")
    assert manager.startup_warnings() == [("old", OpenAIConfig(model="gpt-image-1").startup_warnings()[0])]
    with caplog.at_level(logging.WARNING, logger="image_server.manager"):
        async with manager:
            pass
    (record,) = [r for r in caplog.records if "gpt-image-1" in r.getMessage()]
    assert record.levelno == logging.WARNING and record.getMessage().startswith("generator old: OpenAI shut")
