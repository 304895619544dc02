"""CloudflareGenerator against a local fake of the Workers AI REST API."""

from __future__ import annotations

import base64
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from PIL import Image
from pydantic import ValidationError

from image_server.errors import (
    ContentPolicy,
    GenerationFailed,
    GenerationTimeout,
    GeneratorUnavailable,
    PromptTooLong,
    RateLimited,
    Unsupported,
)
from image_server.generators import RenderJob, check_request, validate_generator_config
from image_server.generators.base import ReferenceImage
from image_server.generators.cloudflare import CloudflareConfig, CloudflareGenerator
from schemas import RenderRequest
from tests.fakes.cloudflare import SD_IMG2IMG, SDXL, SDXL_LIGHTNING, FakeCloudflare, tiny_image

PLANTED_TOKEN = "cfut_PLANTED-token-0123456789"
PLANTED_ACCOUNT = "feedfacecafebeef0123456789abcdef"
RUN_PATH = f"/client/v4/accounts/{PLANTED_ACCOUNT}/ai/run/@cf/black-forest-labs/flux-1-schnell"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeCloudflare]:
    with FakeCloudflare(api_token=PLANTED_TOKEN, account_id=PLANTED_ACCOUNT) as fake:
        yield fake


@pytest.fixture
def fake(server: FakeCloudflare) -> FakeCloudflare:
    server.reset()
    return server


def make(fake: FakeCloudflare, environ: dict[str, str] | None = None, **fields) -> CloudflareGenerator:
    config = CloudflareConfig(base_url=fake.base_url, **fields)
    return CloudflareGenerator(config, name="cf", environ=fake.environ if environ is None else environ)


@pytest.fixture
async def gen(fake: FakeCloudflare) -> AsyncIterator[CloudflareGenerator]:
    async with make(fake) as generator:
        assert isinstance(generator, CloudflareGenerator)
        yield generator


def job(prompt: str = "a lighthouse at dusk", **fields) -> RenderJob:
    return RenderJob(request=RenderRequest(request_id="r1", prompt=prompt, **fields))


async def test_text_to_image_sends_the_contract_request(fake: FakeCloudflare, gen: CloudflareGenerator) -> None:
    result = await gen.generate(job(seed=3, negative_prompt="fog", width=768, height=512))

    (sent,) = fake.requests
    assert (sent.method, sent.path) == ("POST", RUN_PATH)
    headers = {key.lower(): value for key, value in sent.headers.items()}
    assert headers["authorization"] == f"Bearer {PLANTED_TOKEN}"
    assert headers["content-type"] == "application/json"
    assert sent.json() == {"prompt": "a lighthouse at dusk", "steps": 4, "seed": 3}
    (image,) = result.images
    assert image.format == "jpeg" and image.seed == 3
    assert Image.open(io.BytesIO(image.data or b"")).format == "JPEG"
    assert result.applied == {"model": "@cf/black-forest-labs/flux-1-schnell", "steps": 4, "seed": 3}
    assert result.ignored == ["negative_prompt", "width", "height"]


@pytest.mark.parametrize(("requested", "sent"), [(1, 1), (6, 6), (8, 8), (9, 8), (30, 8)])
async def test_steps_are_clamped_to_the_model_maximum(fake, gen, requested: int, sent: int) -> None:
    result = await gen.generate(job(steps=requested))
    assert fake.requests[-1].json()["steps"] == sent
    assert result.applied["steps"] == sent
    assert result.applied.get("steps_requested") == (requested if requested > sent else None)
    assert "steps" not in result.ignored


async def test_steps_are_the_only_override(fake: FakeCloudflare) -> None:
    assert CloudflareConfig.OVERRIDABLE == frozenset({"steps"})
    # What the manager does with generator_config={"steps": 2}:
    config = CloudflareConfig.model_validate({**CloudflareConfig(base_url=fake.base_url).model_dump(), "steps": 2})
    async with CloudflareGenerator(config, environ=fake.environ) as generator:
        result = await generator.generate(job())
    assert fake.requests[-1].json()["steps"] == 2 and result.applied["steps"] == 2


async def test_prompt_too_long_is_refused_before_calling(fake: FakeCloudflare, gen: CloudflareGenerator) -> None:
    assert gen.capabilities.max_prompt_chars == 2048
    long_request = RenderRequest(request_id="r4", prompt="x" * 2049)
    with pytest.raises(PromptTooLong) as info:
        check_request(gen.capabilities, long_request, "cf")  # what the service does first
    assert info.value.code == "prompt_too_long"
    with pytest.raises(PromptTooLong) as info:
        await gen.generate(RenderJob(request=long_request))  # and the generator's own guard
    assert not info.value.retryable and info.value.request_id == "r4"
    assert fake.requests == []
    result = await gen.generate(job("y" * 2048))  # the limit itself is fine (the fake enforces it too)
    assert result.images[0].format == "jpeg"


async def test_image_to_image_is_unsupported(fake: FakeCloudflare, gen: CloudflareGenerator) -> None:
    source = {"image_data": base64.b64encode(tiny_image("png")).decode()}
    with pytest.raises(Unsupported):
        await gen.generate(job(reference_image=source))
    assert fake.requests == []


async def test_a_model_the_table_lacks_gets_prompt_and_steps_and_seed_only_on_request(fake) -> None:
    new = "@cf/someone/new-model"
    fake.models.add(new)
    async with make(fake, model=new) as generator:
        assert generator.capabilities.parameters == frozenset({"steps"})
        result = await generator.generate(job(seed=42, guidance_scale=3.0))
    assert fake.requests[-1].json() == {"prompt": "a lighthouse at dusk", "steps": 4}
    assert result.ignored == ["seed", "guidance_scale"]
    fake.extra_fields[new] = frozenset({"seed"})
    async with make(fake, model=new, send_seed=True) as generator:
        result = await generator.generate(job(seed=42))
    assert fake.requests[-1].json() == {"prompt": "a lighthouse at dusk", "steps": 4, "seed": 42}
    assert result.applied["seed"] == 42 and result.images[0].seed == 42 and "seed" not in result.ignored


@pytest.mark.parametrize(
    ("scenario", "error", "retryable", "status", "error_type"),
    [
        ("daily_limit", RateLimited, False, 429, "3036"),
        ("capacity", RateLimited, True, 429, "3040"),
        ("timeout", GenerationFailed, True, 408, "3007"),
        ("internal", GenerationFailed, True, 500, "5000"),
        ("nsfw", ContentPolicy, False, 400, "3030"),
        ("success_false", GenerationFailed, False, 400, "5000"),
        ("no_image", GenerationFailed, False, None, None),
        ("malformed", GenerationFailed, False, None, None),
    ],
)
async def test_errors_map_to_classes(fake, gen, scenario, error, retryable, status, error_type) -> None:
    fake.scenario = scenario
    with pytest.raises(GenerationFailed) as info:
        await gen.generate(job())
    assert type(info.value) is error
    assert (info.value.retryable, info.value.status, info.value.error_type) == (retryable, status, error_type)
    assert (info.value.request_id, info.value.generator) == ("r1", "cf")


async def test_retry_after_is_propagated(fake: FakeCloudflare, gen: CloudflareGenerator) -> None:
    fake.scenario, fake.retry_after = "capacity", "12"
    with pytest.raises(RateLimited) as info:
        await gen.generate(job())
    assert info.value.retry_after == 12.0


async def test_bad_token_is_an_auth_failure_not_retried(fake: FakeCloudflare) -> None:
    async with make(fake, {**fake.environ, "CLOUDFLARE_API_TOKEN": "wrong"}) as generator:
        with pytest.raises(GenerationFailed) as info:
            await generator.generate(job())
    assert (info.value.status, info.value.retryable, info.value.error_type) == (401, False, "10000")
    assert "authentication failed" in str(info.value)


async def test_unknown_model_is_not_retried(fake: FakeCloudflare) -> None:
    async with make(fake, model="@cf/nobody/no-such-model") as generator:
        with pytest.raises(GenerationFailed) as info:
            await generator.generate(job())
    assert (info.value.status, info.value.retryable, info.value.error_type) == (400, False, "5007")


async def test_raw_image_answers_are_accepted(fake: FakeCloudflare, gen: CloudflareGenerator) -> None:
    fake.scenario = "raw_png"
    result = await gen.generate(job())
    assert result.images[0].format == "png"


async def test_token_and_account_never_appear_in_errors_or_logs(fake, gen, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    fake.scenario = "echo_secrets"
    with pytest.raises(GenerationFailed) as info:
        await gen.generate(job())
    assert "failed for token *** on account ***" in str(info.value)
    for text in (str(info.value), repr(info.value), *map(str, info.value.args)):
        assert PLANTED_TOKEN not in text and PLANTED_ACCOUNT not in text
    # The account id is part of the URL, which httpx logs at INFO; the token never is.
    assert caplog.records and PLANTED_TOKEN not in caplog.text


async def test_slow_provider_times_out(fake: FakeCloudflare) -> None:
    fake.scenario = "slow"
    async with make(fake, request_timeout_s=0.2) as generator:
        started = time.monotonic()
        with pytest.raises(GenerationTimeout) as info:
            await generator.generate(job())
    assert time.monotonic() - started < 2
    assert info.value.retryable and info.value.request_id == "r1"


async def test_health_ok_and_failures(fake: FakeCloudflare, gen: CloudflareGenerator) -> None:
    report = await gen.health()
    assert report.ok, report.detail
    sent = fake.requests[-1]
    assert (sent.method, sent.path) == (
        "GET",
        f"/client/v4/accounts/{PLANTED_ACCOUNT}/ai/models/search?search=flux-1-schnell",
    )

    async with make(fake, {**fake.environ, "CLOUDFLARE_API_TOKEN": "wrong"}) as bad_token:
        report = await bad_token.health()
    assert not report.ok and "authentication failed" in report.detail

    async with make(fake, model="@cf/nobody/no-such-model") as missing:
        report = await missing.health()
    assert not report.ok and "not listed" in report.detail


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"CLOUDFLARE_API_TOKEN": PLANTED_TOKEN}, "CLOUDFLARE_ACCOUNT_ID"),
        ({"CLOUDFLARE_ACCOUNT_ID": PLANTED_ACCOUNT}, "CLOUDFLARE_API_TOKEN"),
        ({"CLOUDFLARE_ACCOUNT_ID": "../../zones", "CLOUDFLARE_API_TOKEN": PLANTED_TOKEN}, "CLOUDFLARE_ACCOUNT_ID"),
    ],
)
async def test_missing_or_bad_credentials_are_unavailable(fake, environ: dict[str, str], named: str) -> None:
    generator = make(fake, environ)
    report = await generator.health()
    assert not report.ok and named in report.detail
    with pytest.raises(GeneratorUnavailable, match=named) as info:
        await generator.open()
    assert PLANTED_TOKEN not in str(info.value) and "zones" not in str(info.value)
    assert fake.requests == []


def test_config_validation_and_registry() -> None:
    config = validate_generator_config("cf", {"strategy": "cloudflare", "steps": 6})
    assert isinstance(config, CloudflareConfig) and config.steps == 6
    bad_tables = (
        {"steps": 9},
        {"max_steps": 9},  # flux-1-schnell takes at most 8
        {"model": SDXL, "max_steps": 21},
        {"model": "@cf/../.."},
        {"model": "@cf/a/b/c"},
        {"base_url": "file:///etc"},
        {"family": "dalle"},
    )
    for bad in bad_tables:
        with pytest.raises(ValidationError):
            CloudflareConfig(**bad)


async def test_lifecycle(fake: FakeCloudflare) -> None:
    generator = make(fake)
    with pytest.raises(RuntimeError, match="not open"):
        await generator.generate(job())
    await generator.open()
    await generator.aclose()
    await generator.aclose()
    assert not (await generator.health()).ok


# -- the Stable Diffusion family -------------------------------------------------------------------


def png_reference(side: int = 300) -> ReferenceImage:
    return ReferenceImage(data=tiny_image("png", (side, side)), format="png", width=side, height=side)


@pytest.mark.parametrize("model", [SDXL, SDXL_LIGHTNING])
async def test_sdxl_models_get_num_steps_size_seed_negative_prompt_and_guidance(fake, model) -> None:
    request = dict(steps=30, seed=5, negative_prompt="fog", guidance_scale=6.5, width=768, height=512, style="noir")
    async with make(fake, model=model) as generator:
        result = await generator.generate(job(**request))
    assert fake.requests[-1].json() == {
        "prompt": "a lighthouse at dusk",
        "num_steps": 20,  # clamped to the model's maximum
        "seed": 5,
        "negative_prompt": "fog",
        "guidance": 6.5,
        "width": 768,
        "height": 512,
    }
    assert result.applied == {
        "model": model,
        "steps": 20,
        "steps_requested": 30,
        "seed": 5,
        "negative_prompt": "fog",
        "guidance_scale": 6.5,
        "width": 768,
        "height": 512,
    }
    assert result.ignored == ["style"]
    assert result.images[0].format == "png"  # these models answer with PNG bytes


async def test_sdxl_default_steps_are_its_own(fake) -> None:
    async with make(fake, model=SDXL) as generator:
        result = await generator.generate(job())
    assert fake.requests[-1].json() == {"prompt": "a lighthouse at dusk", "num_steps": 20}
    assert result.applied == {"model": SDXL, "steps": 20} and result.ignored == []


async def test_img2img_model_sends_the_reference_and_strength(fake) -> None:
    reference = png_reference()
    source = {"image_data": base64.b64encode(reference.data).decode()}
    request = RenderRequest(request_id="r1", prompt="paint it", strength=0.4, reference_image=source)
    async with make(fake, model=SD_IMG2IMG, steps=10) as generator:
        caps = generator.capabilities
        assert caps.image_to_image and not caps.text_to_image and caps.max_reference_images == 1
        assert "strength" in caps.parameters
        result = await generator.generate(RenderJob(request=request, references=[reference]))
    body = fake.requests[-1].json()
    assert base64.b64decode(body.pop("image_b64")) == reference.data
    assert body == {"prompt": "paint it", "num_steps": 10, "strength": 0.4}
    assert result.applied == {"model": SD_IMG2IMG, "steps": 10, "strength": 0.4}


async def test_img2img_model_needs_a_reference_and_text_models_refuse_one(fake) -> None:
    async with make(fake, model=SD_IMG2IMG) as generator:
        with pytest.raises(Unsupported, match="needs a reference image"):
            await generator.generate(job())
    reference = png_reference()
    source = {"image_data": base64.b64encode(reference.data).decode()}
    async with make(fake, model=SDXL) as generator:
        with pytest.raises(Unsupported, match="does not take reference images"):
            await generator.generate(
                RenderJob(request=RenderRequest(request_id="r1", prompt="p", reference_image=source))
            )
    assert fake.requests == []


async def test_sizes_outside_the_sd_range_are_refused_before_calling(fake) -> None:
    async with make(fake, model=SDXL) as generator:
        assert (generator.capabilities.min_size, generator.capabilities.max_size) == (256, 2048)
        with pytest.raises(Unsupported, match="width 128"):
            await generator.generate(job(width=128))
    assert fake.requests == []


@pytest.mark.parametrize(
    ("model", "body", "words"),
    [
        ("@cf/black-forest-labs/flux-1-schnell", {"prompt": "x", "num_steps": 4}, "additional properties: num_steps"),
        ("@cf/black-forest-labs/flux-1-schnell", {"prompt": "x", "width": 512}, "additional properties: width"),
        ("@cf/black-forest-labs/flux-1-schnell", {"prompt": "x", "steps": 9}, "/steps"),
        (SDXL, {"prompt": "x", "steps": 4}, "additional properties: steps"),
        (SDXL, {"prompt": "x", "num_steps": 21}, "/num_steps"),
        (SDXL, {"prompt": "x", "width": 4096}, "/width"),
        (SDXL, {"prompt": "x", "strength": 2}, "/strength"),
        (SD_IMG2IMG, {"prompt": "x"}, "image"),
        (SD_IMG2IMG, {"prompt": "x", "image_b64": "not base64!"}, "base64"),
    ],
)
def test_fake_refuses_fields_the_model_does_not_take(fake, model, body, words) -> None:
    problem = fake.validate(model, json.dumps(body).encode())
    assert problem is not None and words in problem
