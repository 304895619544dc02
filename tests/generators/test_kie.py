"""KieGenerator (Seedream v4) against a local fake of Kie's task, upload and credit APIs."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image
from pydantic import ValidationError

from image_server.errors import (
    ContentPolicy,
    GenerationFailed,
    GeneratorUnavailable,
    PromptTooLong,
    RateLimited,
    ReferenceImageError,
    Unsupported,
)
from image_server.generators import ReferenceImage, RenderJob, validate_generator_config
from image_server.generators.kie import KieConfig, KieGenerator
from image_server.generators.kie.wire import size_for
from schemas import ImageSource, RenderRequest
from tests.fakes.images import serve_images, solid_bytes
from tests.fakes.kie import EDIT_MODEL, TEXT_MODEL, FakeKie, output_size
from tests.fakes.multipart import parse_multipart

PLANTED = "kie-PLANTED-key-0123456789abcdef"
FAST = {"poll_interval_s": 0.01, "poll_max_interval_s": 0.02}


@pytest.fixture(scope="module")
def server() -> Iterator[FakeKie]:
    with FakeKie(api_key=PLANTED) as fake:
        yield fake


@pytest.fixture
def fake(server: FakeKie) -> FakeKie:
    server.reset()
    return server


def make(fake: FakeKie, environ: dict[str, str] | None = None, **fields: Any) -> KieGenerator:
    config = KieConfig(base_url=fake.url, upload_base_url=fake.url, **(FAST | fields))
    return KieGenerator(config, name="kie", environ=fake.environ if environ is None else environ)


@pytest.fixture
async def gen(fake: FakeKie) -> AsyncIterator[KieGenerator]:
    async with make(fake) as generator:
        assert isinstance(generator, KieGenerator)
        yield generator


def job(prompt: str = "a koi pond at dawn", references: list[ReferenceImage] | None = None, **fields: Any) -> RenderJob:
    return RenderJob(request=RenderRequest(request_id="r1", prompt=prompt, **fields), references=references or [])


def png_reference(color: tuple[int, int, int] = (10, 200, 30)) -> ReferenceImage:
    return ReferenceImage(data=solid_bytes(color, (16, 16), "png"), format="png", width=16, height=16)


def headers_of(request: Any) -> dict[str, str]:
    return {key.lower(): value for key, value in request.headers.items()}


# -- text-to-image ----------------------------------------------------------------------------------


async def test_text_to_image_follows_the_task_contract(fake: FakeKie, gen: KieGenerator) -> None:
    progress: list[str | None] = []
    work = job(seed=42, negative_prompt="fog", steps=20)
    work.progress = lambda fraction, message: progress.append(message)
    result = await gen.generate(work)

    create, *polls, download = fake.requests
    assert (create.method, create.path) == ("POST", "/api/v1/jobs/createTask")
    assert headers_of(create)["authorization"] == f"Bearer {PLANTED}"
    body = create.json()
    assert body == {"model": TEXT_MODEL, "input": {"prompt": "a koi pond at dawn", "max_images": 1, "seed": 42}}
    task_id = "task_seedream_0001"
    assert [urlsplit(p.path).path for p in polls] == ["/api/v1/jobs/recordInfo"] * 4
    assert all(parse_qs(urlsplit(p.path).query) == {"taskId": [task_id]} for p in polls)
    # The result URL is fetched right after the success answer, and never with the key.
    assert download.path == f"/files/results/{task_id}/0.png"
    assert "authorization" not in headers_of(download)
    assert progress == ["waiting", "queuing", "generating", "downloading"]
    (image,) = result.images
    assert image.format == "png" and image.seed == 42
    assert Image.open(io.BytesIO(image.data or b"")).size == (8, 8)
    assert result.applied == {"model": TEXT_MODEL, "max_images": 1, "seed": 42, "task_id": task_id}
    assert result.ignored == ["negative_prompt", "steps"]
    assert result.prompt == "a koi pond at dawn"


@pytest.mark.parametrize(
    ("width", "height", "image_size", "resolution"),
    [
        (1024, 1024, "square_hd", "1K"),
        (768, 1024, "portrait_4_3", "1K"),
        (1600, 900, "landscape_16_9", "2K"),
        (2048, 1365, "landscape_3_2", "2K"),
        (4096, 1755, "landscape_21_9", "4K"),
        (720, 1280, "portrait_16_9", "2K"),
    ],
)
async def test_width_and_height_map_to_a_preset_and_resolution(fake, gen, width, height, image_size, resolution):
    result = await gen.generate(job(width=width, height=height))
    sent = fake.paths("/api/v1/jobs/createTask")[0].json()["input"]
    assert (sent["image_size"], sent["image_resolution"]) == (image_size, resolution)
    assert (result.applied["image_size"], result.applied["image_resolution"]) == (image_size, resolution)
    assert "width" not in result.ignored and "height" not in result.ignored
    # The fake renders at 1/128 of the nominal size of what it was sent.
    assert Image.open(io.BytesIO(result.images[0].data or b"")).size == output_size(image_size, resolution)


def test_size_mapping_never_goes_below_the_requested_long_side():
    assert size_for(1025, 1025) == ("square_hd", "2K")
    assert size_for(2049, 64) == ("landscape_21_9", "4K")
    assert size_for(64, 64) == ("square_hd", "1K")


async def test_configured_size_applies_only_without_request_size(fake):
    async with make(fake, image_size="landscape_4_3", image_resolution="2K", nsfw_checker=False) as gen:
        plain = await gen.generate(job())
        sized = await gen.generate(job(width=512, height=512))
    first, second = (r.json()["input"] for r in fake.paths("/api/v1/jobs/createTask"))
    assert (first["image_size"], first["image_resolution"], first["nsfw_checker"]) == ("landscape_4_3", "2K", False)
    assert (second["image_size"], second["image_resolution"]) == ("square_hd", "1K")
    assert plain.applied["nsfw_checker"] is False and sized.applied["image_size"] == "square_hd"


async def test_num_images_becomes_max_images_and_is_asked_for_in_the_prompt(fake, gen):
    result = await gen.generate(job(num_images=3))
    sent = fake.paths("/api/v1/jobs/createTask")[0].json()["input"]
    assert sent["max_images"] == 3 and sent["prompt"].endswith("Generate 3 separate images.")
    assert result.prompt == sent["prompt"]  # ImageReady reports the prompt as sent
    assert len(result.images) == 3 and len({image.data for image in result.images}) == 3
    assert "images_returned" not in result.applied

    fake.images_made = 2  # max_images is a cap: Seedream may make fewer
    fewer = await gen.generate(job(num_images=4))
    assert len(fewer.images) == 2 and fewer.applied["images_returned"] == 2


async def test_count_in_prompt_can_be_turned_off(fake):
    async with make(fake, count_in_prompt=False) as gen:
        result = await gen.generate(job(num_images=2))
    assert fake.paths("/api/v1/jobs/createTask")[0].json()["input"]["prompt"] == "a koi pond at dawn"
    assert result.prompt == "a koi pond at dawn"


async def test_limits_are_refused_before_any_call(fake, gen):
    with pytest.raises(Unsupported, match="at most 6 images"):
        await gen.generate(job(num_images=7))
    with pytest.raises(PromptTooLong):
        await gen.generate(job(prompt="x" * 5001))
    assert fake.requests == []


# -- polling ----------------------------------------------------------------------------------------


async def test_slow_tasks_are_polled_with_growing_intervals(fake):
    fake.polls_per_state = 2  # six pending polls, then success
    async with make(fake, poll_interval_s=0.05, poll_backoff=2.0, poll_max_interval_s=0.2) as gen:
        started = time.monotonic()
        result = await gen.generate(job())
        elapsed = time.monotonic() - started
    assert len(result.images) == 1
    assert len(fake.paths("/api/v1/jobs/recordInfo")) == 7
    # Waits of 0.05, 0.1, then 0.2 five times: at least 1.15 s (0.35 s without the backoff).
    assert elapsed >= 1.15


async def test_transient_poll_errors_poll_on_without_a_second_task(fake, gen):
    fake.errors["poll"].extend([(500, "Server Error"), (429, "Too many requests"), (455, "maintenance")])
    result = await gen.generate(job())
    assert len(result.images) == 1
    assert len(fake.paths("/api/v1/jobs/createTask")) == 1  # a new task would be billed again


async def test_a_poll_error_that_persists_is_reported_as_itself(fake, gen):
    fake.errors["poll"].extend([(429, "Too many requests")] * 5)
    with pytest.raises(RateLimited) as caught:
        await gen.generate(job())
    assert caught.value.retryable and caught.value.status == 429
    assert len(fake.paths("/api/v1/jobs/createTask")) == 1


async def test_an_unknown_task_fails_at_once(fake, gen):
    fake.message_key = "message"  # recordInfo's envelope sometimes says "message", not "msg"
    fake.errors["poll"].append((422, "recordInfo is null"))
    with pytest.raises(GenerationFailed, match=r"validation error \(code 422\): recordInfo is null") as caught:
        await gen.generate(job())
    assert not caught.value.retryable and caught.value.request_id == "r1" and caught.value.generator == "kie"


async def test_timeout_stops_polling_and_says_the_task_runs_on(fake, gen, caplog):
    caplog.set_level(logging.INFO)
    fake.polls_per_state = 10_000
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await gen.generate(job())
    assert "Kie has no cancel" in caplog.text and "task_seedream_0001" in caplog.text
    polls = len(fake.paths("/api/v1/jobs/recordInfo"))
    await asyncio.sleep(0.1)
    assert len(fake.paths("/api/v1/jobs/recordInfo")) == polls  # nothing polls on in the background


# -- errors -----------------------------------------------------------------------------------------

BUSINESS_CODES = [
    (401, "You do not have access permissions", GenerationFailed, False, "authentication failed"),
    (402, "Credits insufficient", GenerationFailed, False, "insufficient credits"),
    (422, "input.image_size is invalid", GenerationFailed, False, "validation error"),
    (429, "Rate limited", RateLimited, True, "code 429"),
    (433, "Sub-key usage limit exceeded", GenerationFailed, False, "sub-key usage limit"),
    (455, "Service unavailable: maintenance", GenerationFailed, True, "maintenance"),
    (500, "Server Error", GenerationFailed, True, "server error"),
    (501, "Generation failed", GenerationFailed, False, "generation failed"),
    (505, "Feature disabled", GenerationFailed, False, "feature disabled"),
]


@pytest.mark.parametrize("mirror", [False, True], ids=["http-200", "http-mirrors-code"])
@pytest.mark.parametrize(("code", "msg", "error", "retryable", "wording"), BUSINESS_CODES)
async def test_business_codes_map_whatever_the_http_status(fake, gen, mirror, code, msg, error, retryable, wording):
    fake.mirror_status = mirror
    fake.errors["create"].append((code, msg))
    with pytest.raises(error) as caught:
        await gen.generate(job())
    exc = caught.value
    assert type(exc) is error and exc.retryable is retryable and exc.status == code
    assert wording in exc.message and msg in exc.message
    assert fake.paths("/api/v1/jobs/recordInfo") == []


@pytest.mark.parametrize(
    ("fail_code", "fail_msg", "error", "retryable"),
    [
        ("400", "The content you submitted may contain sensitive information", ContentPolicy, False),
        (500, "Internal error, please try again", GenerationFailed, True),
        ("501", "Image generation failed", GenerationFailed, False),
        ("E_UNKNOWN", "something odd happened", GenerationFailed, False),
    ],
)
async def test_a_failed_task_is_reported_with_its_reason(fake, gen, fail_code, fail_msg, error, retryable):
    fake.fail = (fail_code, fail_msg)
    with pytest.raises(error) as caught:
        await gen.generate(job())
    assert type(caught.value) is error and caught.value.retryable is retryable
    assert fail_msg in caught.value.message and str(fail_code) in caught.value.message


async def test_an_expired_result_url_is_a_clear_failure(fake, gen):
    fake.result_ttl_s = 0.0
    with pytest.raises(GenerationFailed, match="downloading the result image failed") as caught:
        await gen.generate(job())
    assert caught.value.status == 403 and not caught.value.retryable


async def test_a_result_download_that_fails_transiently_is_tried_again_without_a_new_task(fake, gen):
    fake.result_errors.extend([503, 500])
    result = await gen.generate(job())
    assert len(result.images) == 1
    assert len(fake.paths("/files/results/")) == 3 and len(fake.paths("/api/v1/jobs/createTask")) == 1

    fake.result_errors.extend([503] * 3)
    with pytest.raises(GenerationFailed, match="HTTP 503") as caught:
        await gen.generate(job())
    assert caught.value.retryable  # the manager may now try a new task


async def test_a_wrong_key_quoted_back_is_scrubbed(fake):
    fake.echo_key = True
    fake.errors["create"].append((500, "upstream says"))
    async with make(fake, environ={"KIE_API_KEY": "kie-other-PLANTED-key"}) as gen:
        with pytest.raises(GenerationFailed) as caught:
            await gen.generate(job())
    assert "PLANTED" not in caught.value.message and "***" in caught.value.message
    assert "authentication failed" in caught.value.message


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"state": "success", "resultJson": "{not json"}, "resultJson is not JSON"),
        ({"state": "success", "resultJson": '{"resultUrls": []}'}, "no resultUrls"),
        ({"state": "success", "resultJson": '{"resultUrls": ["file:///etc/passwd"]}'}, "not an http"),
        ({"taskId": "x"}, "no state"),
    ],
)
async def test_malformed_records_fail_clearly(fake, gen, record, reason, monkeypatch):
    monkeypatch.setattr(fake, "poll", lambda task_id: record)
    with pytest.raises(GenerationFailed, match=reason):
        await gen.generate(job())


async def test_without_a_key_open_fails_and_health_says_so(fake):
    generator = make(fake, environ={})
    with pytest.raises(GeneratorUnavailable, match="KIE_API_KEY"):
        await generator.open()
    report = await generator.health()
    assert not report.ok and "KIE_API_KEY" in report.detail


# -- references -------------------------------------------------------------------------------------


async def test_edit_uploads_references_as_base64_and_sends_their_urls(fake, gen):
    references = [png_reference((255, 0, 0)), png_reference((0, 0, 255))]
    sources = [ImageSource(image_data=base64.b64encode(ref.data).decode()) for ref in references]
    result = await gen.generate(job("make it night", references, reference_images=sources))

    uploads = fake.paths("/api/file-base64-upload")
    assert len(uploads) == 2
    names = set()
    for upload in uploads:
        assert headers_of(upload)["authorization"] == f"Bearer {PLANTED}"
        body = upload.json()
        assert body["uploadPath"] == "image-server" and body["fileName"].endswith(".png")
        header, _, data = body["base64Data"].partition(",")
        assert header == "data:image/png;base64" and base64.b64decode(data) in {ref.data for ref in references}
        names.add(body["fileName"])
    assert len(names) == 2  # unique names: Kie overwrites a file of the same name
    sent = fake.paths("/api/v1/jobs/createTask")[0].json()
    assert sent["model"] == EDIT_MODEL
    # In the request's order, each the downloadUrl of the upload of that very image.
    for url, reference in zip(sent["input"]["image_urls"], references, strict=True):
        assert fake.files[urlsplit(url).path][0] == reference.data
    assert result.applied["model"] == EDIT_MODEL and result.applied["reference_images"] == 2
    assert result.applied["reference_uploads"] == 2


async def test_stream_upload_sends_multipart(fake):
    reference = png_reference()
    async with make(fake, upload="stream", upload_path="renders/refs") as gen:
        await gen.generate(job("sharpen", [reference], reference_image=ImageSource(image_data="eA==")))
    (upload,) = fake.paths("/api/file-stream-upload")
    fields, files = parse_multipart(upload.body, headers_of(upload)["content-type"])
    assert fields["uploadPath"] == ["renders/refs"] and files[0].field == "file"
    assert files[0].data == reference.data and files[0].content_type == "image/png"
    (url,) = fake.paths("/api/v1/jobs/createTask")[0].json()["input"]["image_urls"]
    assert fake.files[urlsplit(url).path][0] == reference.data


async def test_http_references_pass_through_unless_configured_otherwise(fake):
    with serve_images() as images:
        given = images.url("/image.png")
        references = [png_reference(), png_reference((1, 2, 3))]
        sources = [ImageSource(uri=given), ImageSource(image_data="eA==")]
        async with make(fake) as gen:
            result = await gen.generate(job("recolour", references, reference_images=sources))
        first, second = fake.paths("/api/v1/jobs/createTask")[0].json()["input"]["image_urls"]
        assert first == given and second.startswith(fake.url + "/files/uploads/")
        assert result.applied["reference_uploads"] == 1
        assert images.paths == ["/image.png"]  # the fake, like Kie, fetched the URL itself

        async with make(fake, pass_through_urls=False) as gen:
            result = await gen.generate(job("recolour", references, reference_images=sources))
        assert result.applied["reference_uploads"] == 2


async def test_a_reference_over_10_mb_is_refused_before_any_upload(fake, gen):
    big = ReferenceImage(data=b"\x89PNG\r\n\x1a\n" + bytes(10 * 1024 * 1024), format="png", width=8, height=8)
    with pytest.raises(ReferenceImageError, match="at most 10485760 bytes"):
        await gen.generate(job("x", [png_reference(), big], reference_images=[ImageSource(image_data="eA==")] * 2))
    assert fake.requests == []


async def test_upload_errors_map_like_any_kie_error(fake, gen):
    fake.errors["upload"].append((402, "Credits insufficient"))
    with pytest.raises(GenerationFailed, match="insufficient credits") as caught:
        await gen.generate(job("x", [png_reference()], reference_image=ImageSource(image_data="eA==")))
    assert not caught.value.retryable
    assert fake.paths("/api/v1/jobs/createTask") == []


# -- health and config ------------------------------------------------------------------------------


async def test_health_reads_the_credit_balance(fake, gen):
    report = await gen.health()
    assert report.ok and "100 credits left" in report.detail
    (call,) = fake.requests
    assert call.path == "/api/v1/chat/credit" and headers_of(call)["authorization"] == f"Bearer {PLANTED}"
    fake.credits = 0
    report = await gen.health()
    assert not report.ok and "no credits" in report.detail
    async with make(fake, environ={"KIE_API_KEY": "wrong"}) as wrong:
        report = await wrong.health()
    assert not report.ok and "authentication failed" in report.detail


def test_config_defaults_and_validation():
    config = validate_generator_config("kie", {"strategy": "kie"})
    assert isinstance(config, KieConfig)
    assert (config.base_url, config.upload_base_url) == ("https://api.kie.ai", "https://kieai.redpandaai.co")
    assert config.poll_interval_s == 2.5 and config.timeout_s == 300.0 and config.api_key_env == "KIE_API_KEY"
    for bad in ({"image_size": "huge"}, {"image_resolution": "8K"}, {"upload_path": "/lead"}, {"upload": "ftp"}):
        with pytest.raises(ValidationError):
            KieConfig(**bad)
    with pytest.raises(ValidationError, match="poll_max_interval_s"):
        KieConfig(poll_interval_s=20, poll_max_interval_s=10)
    assert KieConfig.OVERRIDABLE == {"image_size", "image_resolution", "nsfw_checker"}
