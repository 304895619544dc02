"""RunwareGenerator against a local fake of Runware's task-array REST API."""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from PIL import Image
from pydantic import ValidationError

from image_server.errors import ContentPolicy, GenerationFailed, InvalidRequest, RateLimited
from image_server.generators import ReferenceImage, RenderJob, validate_generator_config
from image_server.generators.runware import RunwareConfig, RunwareGenerator
from schemas import LoraSpec, RenderRequest
from tests.fakes.images import solid_bytes
from tests.fakes.runware import FakeRunware

KEY = "PLANTED-runware-key-0123456789"
LORA = "civitai:58390@62833"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeRunware]:
    with FakeRunware(api_key=KEY) as fake:
        yield fake


@pytest.fixture
def fake(server: FakeRunware) -> FakeRunware:
    server.reset()
    return server


def make(fake: FakeRunware, environ: dict[str, str] | None = None, **fields) -> RunwareGenerator:
    config = RunwareConfig(base_url=fake.base_url, poll_interval_s=0.01, poll_max_interval_s=0.02, **fields)
    return RunwareGenerator(config, name="rw", environ=fake.environ if environ is None else environ)


@pytest.fixture
async def gen(fake: FakeRunware) -> AsyncIterator[RunwareGenerator]:
    async with make(fake) as generator:
        assert isinstance(generator, RunwareGenerator)
        yield generator


def job(prompt: str = "a fox in snow", references: list[ReferenceImage] | None = None, **fields) -> RenderJob:
    return RenderJob(request=RenderRequest(request_id="r1", prompt=prompt, **fields), references=references or [])


def reference() -> ReferenceImage:
    return ReferenceImage(solid_bytes((9, 9, 200), (16, 16), "png"), "png", 16, 16)


async def test_text_to_image_sends_one_inference_task(fake: FakeRunware, gen: RunwareGenerator) -> None:
    result = await gen.generate(
        job(width=1000, height=700, seed=11, steps=25, guidance_scale=4.5, negative_prompt="fog", num_images=2)
    )

    (call,) = fake.requests
    assert call.headers["authorization"] == f"Bearer {KEY}" and call.path == "/v1"
    (task,) = call.json()
    task_uuid = task.pop("taskUUID")
    assert str(uuid.UUID(task_uuid, version=4)) == task_uuid
    assert task == {
        "taskType": "imageInference",
        "model": "runware:101@1",
        "positivePrompt": "a fox in snow",
        "negativePrompt": "fog",
        "width": 1024,  # snapped to a multiple of 64
        "height": 704,
        "numberResults": 2,
        "outputType": "base64Data",
        "outputFormat": "PNG",
        "deliveryMethod": "sync",
        "steps": 25,
        "CFGScale": 4.5,
        "seed": 11,
    }
    assert [image.format for image in result.images] == ["png", "png"]
    assert [image.seed for image in result.images] == [11, 11]
    assert Image.open(io.BytesIO(result.images[0].data or b"")).size == (8, 8)
    assert result.applied == {
        "model": "runware:101@1",
        "width": 1024,
        "height": 704,
        "steps": 25,
        "guidance_scale": 4.5,
        "seed": 11,
    }
    assert result.ignored == []


@pytest.mark.parametrize(("output_type", "fmt"), [("URL", "webp"), ("dataURI", "jpeg"), ("base64Data", "jpeg")])
async def test_each_output_type_is_read(fake: FakeRunware, output_type: str, fmt: str) -> None:
    async with make(fake, output_type=output_type) as gen:
        result = await gen.generate(job(output_format=fmt))
    assert [image.format for image in result.images] == [fmt]
    downloads = [r for r in fake.requests if r.method == "GET"]
    assert len(downloads) == (output_type == "URL")
    assert all("authorization" not in {k.lower() for k in r.headers} for r in downloads)


async def test_references_are_uploaded_then_used_as_seed_image(fake: FakeRunware, gen: RunwareGenerator) -> None:
    result = await gen.generate(job(references=[reference()], strength=0.35))
    (upload,) = fake.tasks("imageUpload")
    assert upload["image"].startswith("data:image/png;base64,")
    (image_uuid,) = fake.uploads
    assert fake.uploads[image_uuid] == reference().data
    (task,) = fake.tasks("imageInference")
    assert task["seedImage"] == image_uuid and task["strength"] == 0.35
    assert result.applied["strength"] == 0.35 and result.applied["reference_upload"] == "image_upload"


async def test_reference_images_mode_sends_all_references_inline(fake: FakeRunware) -> None:
    async with make(fake, reference_mode="reference_images", upload="inline") as gen:
        result = await gen.generate(job(references=[reference(), reference()], strength=0.5))
    (task,) = fake.tasks("imageInference")
    assert len(task["referenceImages"]) == 2 and all(r.startswith("data:image/png") for r in task["referenceImages"])
    assert "seedImage" not in task and "strength" not in task
    assert result.ignored == ["strength"] and fake.tasks("imageUpload") == []


async def test_loras_go_in_the_lora_list(fake: FakeRunware, gen: RunwareGenerator) -> None:
    result = await gen.generate(job(loras=[LoraSpec(name=LORA, strength=0.8)]))
    (task,) = fake.tasks("imageInference")
    assert task["lora"] == [{"model": LORA, "weight": 0.8}]
    assert result.applied["lora"] == [{"model": LORA, "weight": 0.8}]
    with pytest.raises(InvalidRequest, match="AIR ids"):
        await gen.generate(job(loras=[LoraSpec(name="my-style")]))


async def test_loras_ignored_when_turned_off(fake: FakeRunware) -> None:
    async with make(fake, loras=False) as gen:
        result = await gen.generate(job(loras=[LoraSpec(name=LORA)]))
    assert "loras" in result.ignored and "lora" not in result.applied
    (call,) = fake.requests
    (task,) = call.json()
    assert "lora" not in task


async def test_async_delivery_polls_get_response(fake: FakeRunware) -> None:
    fake.processing_polls = 2
    seen: list[tuple[float | None, str | None]] = []
    async with make(fake, delivery_method="async") as gen:
        render = job(num_images=2)
        render.progress = lambda fraction, message: seen.append((fraction, message))
        result = await gen.generate(render)
    assert len(result.images) == 2
    assert len(fake.tasks("getResponse")) == 3
    assert seen == [(None, "processing"), (None, "processing")]


async def test_async_poll_failures_are_waited_out_up_to_a_limit(fake: FakeRunware) -> None:
    fake.failing_polls = 2
    async with make(fake, delivery_method="async", poll_failures_tolerated=2) as gen:
        assert len((await gen.generate(job())).images) == 1
        fake.failing_polls = 3
        with pytest.raises(GenerationFailed, match="HTTP 503") as caught:
            await gen.generate(job())
    assert caught.value.retryable and len(fake.inferences) == 2  # no task was submitted twice


async def test_async_task_error(fake: FakeRunware) -> None:
    fake.scenario = "async_error"
    async with make(fake, delivery_method="async") as gen:
        with pytest.raises(GenerationFailed, match="inferenceFailed"):
            await gen.generate(job())


async def test_nsfw_flag_is_content_policy(fake: FakeRunware) -> None:
    fake.scenario = "nsfw"
    async with make(fake, check_nsfw=True) as gen:
        with pytest.raises(ContentPolicy, match="NSFW"):
            await gen.generate(job())
    assert fake.tasks("imageInference")[0]["checkNSFW"] is True


@pytest.mark.parametrize(
    ("scenario", "error", "retryable", "words"),
    [
        ("rate_limited", RateLimited, True, "rateLimitExceeded"),
        ("no_credits", GenerationFailed, False, "payment required"),
        ("task_error", GenerationFailed, False, "invalidModel"),
        ("echo_key", GenerationFailed, True, "***"),
        ("malformed", GenerationFailed, False, "malformed JSON"),
    ],
)
async def test_failures_map_to_our_errors(fake, gen, scenario, error, retryable, words) -> None:
    fake.scenario = scenario
    with pytest.raises(error) as caught:
        await gen.generate(job())
    assert type(caught.value) is error and caught.value.retryable is retryable
    assert words in str(caught.value) and KEY not in str(caught.value)
    assert caught.value.request_id == "r1"
    if scenario == "rate_limited":
        assert caught.value.retry_after == 3.0


async def test_a_refused_parameter_is_a_clear_error(fake: FakeRunware) -> None:
    fake.size_multiple = 128  # a model stricter than the configured multiple of 64
    async with make(fake) as gen:
        with pytest.raises(GenerationFailed, match="invalidWidth: width must be a multiple of 128") as caught:
            await gen.generate(job(width=960, height=1024))
    assert caught.value.status == 400 and not caught.value.retryable


async def test_a_wrong_key(fake: FakeRunware) -> None:
    async with make(fake, environ={"RUNWARE_API_KEY": "wrong"}) as gen:
        with pytest.raises(GenerationFailed, match="authentication failed.*invalidApiKey") as caught:
            await gen.generate(job())
        health = await gen.health()
    assert caught.value.status == 401 and not health.ok


async def test_health_is_a_dry_run(fake: FakeRunware, gen: RunwareGenerator) -> None:
    report = await gen.health()
    assert report.ok, report.detail
    (call,) = fake.requests
    headers = {key.lower(): value for key, value in call.headers.items()}
    assert headers["x-runware-dry-run"] == "1" and fake.inferences == []


async def test_delivery_url_hands_runwares_urls_on(fake: FakeRunware, gen: RunwareGenerator) -> None:
    result = await gen.generate(job(delivery="url"))
    (task,) = fake.tasks("imageInference")
    assert task["outputType"] == "URL"
    assert result.images[0].url is not None and result.images[0].url.startswith(fake.url + "/images/")
    assert not [r for r in fake.requests if r.method == "GET"]


async def test_the_fake_takes_only_arrays_and_the_auth_task(fake: FakeRunware) -> None:
    """The fake is as strict as the contract: an object body is a 400; the auth task works."""
    import httpx

    async with httpx.AsyncClient() as client:
        single = await client.post(
            fake.base_url, json={"taskType": "imageInference"}, headers={"authorization": f"Bearer {KEY}"}
        )
        tasks = [
            {"taskType": "authentication", "apiKey": KEY},
            {"taskType": "imageUpload", "taskUUID": "u1", "image": base64.b64encode(b"x").decode()},
        ]
        authed = await client.post(fake.base_url, json=tasks)
    assert single.status_code == 400
    assert authed.status_code == 200 and authed.json()["data"][0]["taskUUID"] == "u1"


def test_config_is_validated() -> None:
    assert isinstance(validate_generator_config("rw", {"strategy": "runware", "model": LORA}), RunwareConfig)
    for bad in ({"model": "flux"}, {"arguments": {"seedImage": "x"}}, {"output_type": "png"}, {"min_size": 4096}):
        with pytest.raises((ValidationError, ValueError)):
            RunwareConfig(**bad)
