"""FalGenerator against a fake fal (queue, run, storage, CDN) on 127.0.0.1 (tests/fakes/fal.py),
reached through the generator's own host config."""

from __future__ import annotations

import asyncio
import base64
import io
import socket

import pytest
from PIL import Image
from pydantic import ValidationError

from image_server.errors import (
    ContentPolicy,
    GenerationFailed,
    GeneratorUnavailable,
    InvalidRequest,
    RateLimited,
    Unsupported,
)
from image_server.generators.base import ReferenceImage, RenderJob
from image_server.generators.fal import FalConfig, FalGenerator
from image_server.generators.fal.config import KNOWN_ENDPOINTS, EndpointSpec
from image_server.generators.fal.wire import map_steps
from image_server.generators.registry import validate_generator_config
from image_server.manager import GeneratorManager
from schemas import RenderRequest
from tests.fakes.fal import FakeError, FakeFal, serve_fal

LIGHTNING = "fal-ai/fast-lightning-sdxl"
LIGHTNING_I2I = "fal-ai/fast-lightning-sdxl/image-to-image"
SCHNELL = "fal-ai/flux/schnell"
FLUX_I2I = "fal-ai/flux/dev/image-to-image"
DEADLINE = 5


@pytest.fixture
def fake():
    with serve_fal() as fake:
        yield fake


def make_generator(fake: FakeFal, endpoint: str = LIGHTNING, *, key: str | None = None, **fields) -> FalGenerator:
    config = FalConfig(endpoint=endpoint, poll_interval_s=0.01, **(fake.hosts() | fields))
    return FalGenerator(config, name="falai", environ={"FAL_KEY": fake.scenario.key if key is None else key})


def make_job(*, references: list[ReferenceImage] | None = None, **fields) -> tuple[RenderJob, list]:
    """The job and the progress it reports: (fraction, message, queue_position) each."""
    events: list[tuple[float | None, str | None, int | None]] = []

    def progress(fraction: float | None, message: str | None, /, queue_position: int | None = None) -> None:
        events.append((fraction, message, queue_position))

    request = RenderRequest(request_id="r-1", prompt=fields.pop("prompt", "a red fox"), **fields)
    return RenderJob(request=request, references=references or [], progress=progress), events


def png_reference(side: int = 16) -> ReferenceImage:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (1, 2, 3)).save(buffer, format="PNG")
    return ReferenceImage(data=buffer.getvalue(), format="png", width=side, height=side)


async def render(generator: FalGenerator, job: RenderJob):
    async with generator, asyncio.timeout(DEADLINE):
        return await generator.generate(job)


def submitted(fake: FakeFal) -> dict:
    (job,) = fake.jobs.values()
    return job.arguments


# -- success paths ---------------------------------------------------------------------------------


async def test_text_to_image_maps_request_and_reports_progress(fake):
    job, events = make_job(steps=3, seed=7, width=512, height=768, negative_prompt="blur", guidance_scale=2.0)
    result = await render(make_generator(fake), job)

    args = submitted(fake)
    assert args["num_inference_steps"] == "4"  # lightning takes the string enum 1/2/4/8
    assert args["image_size"] == {"width": 512, "height": 768}
    assert args["seed"] == 7 and args["format"] == "png" and args["enable_safety_checker"] is True
    assert "negative_prompt" not in args and "guidance_scale" not in args
    assert result.ignored == ["negative_prompt", "guidance_scale"]
    assert result.applied["steps"] == 4 and result.applied["seed"] == 7
    assert events == [
        (None, "queued at fal, position 1", 1),
        (None, "queued at fal, position 0", 0),
        (None, "generating", None),
        (1.0, "completed", None),
    ]
    (image,) = result.images
    assert image.format == "png" and image.data is not None and image.data.startswith(b"\x89PNG")
    assert (image.width, image.height, image.seed) == (8, 8, 7)
    assert result.prompt == "a red fox"
    assert all(r.headers["Authorization"] == f"Key {fake.scenario.key}" for r in fake.requests("POST", "/fal-ai"))
    # fal drops the request if it is still queued when the render's timeout_s (120 s) runs out.
    assert fake.requests("POST", "/fal-ai")[0].headers["X-Fal-Request-Timeout"] == "120.0"


async def test_flux_schnell_clamps_steps_passes_guidance_and_downloads_all_images(fake):
    job, _ = make_job(steps=30, guidance_scale=3.5, num_images=3, output_format="jpeg", style="noir")
    result = await render(make_generator(fake, SCHNELL, image_size="landscape_16_9"), job)

    args = submitted(fake)
    assert args["num_inference_steps"] == 12 and args["guidance_scale"] == 3.5
    assert args["image_size"] == "landscape_16_9" and args["output_format"] == "jpeg" and args["num_images"] == 3
    assert [img.format for img in result.images] == ["jpeg"] * 3
    assert len({img.data for img in result.images}) == 3
    assert len(fake.requests("GET", "/files/")) == 3
    assert result.ignored == ["style"]


async def test_webp_request_asks_fal_for_png(fake):
    result = await render(make_generator(fake, SCHNELL), make_job(output_format="webp")[0])
    assert submitted(fake)["output_format"] == "png" and result.applied["output_format"] == "png"


async def test_configured_output_format_wins(fake):
    result = await render(make_generator(fake, SCHNELL, output_format="jpeg"), make_job()[0])
    assert result.images[0].format == "jpeg"


async def test_image_to_image_with_data_uri(fake):
    reference = png_reference()
    job, _ = make_job(references=[reference], strength=0.4, width=512, height=512, reference_image={"uri": "data:,x"})
    result = await render(make_generator(fake, FLUX_I2I, upload="data_uri"), job)

    args = submitted(fake)
    header, _, payload = args["image_url"].partition(",")
    assert header == "data:image/png;base64" and base64.b64decode(payload) == reference.data
    assert args["strength"] == 0.4 and "image_size" not in args
    assert result.ignored == ["width", "height"]
    assert result.applied["reference_upload"] == "data_uri"
    assert not fake.requests("POST", "/storage")


async def test_image_to_image_with_storage_upload(fake):
    reference = png_reference()
    job, _ = make_job(references=[reference], reference_image={"uri": "data:,x"})
    result = await render(make_generator(fake, LIGHTNING_I2I, upload="storage", strength=0.7), job)

    args = submitted(fake)
    assert args["image_url"].startswith(f"{fake.base_url}/files/upload-") and args["strength"] == 0.7
    (upload,) = fake.requests("POST", "/files/upload")
    assert upload.body == reference.data and upload.headers["Content-Type"] == "image/png"
    assert fake.requests("POST", "/storage/auth/token")[0].headers["Authorization"] == f"Key {fake.scenario.key}"
    assert result.applied["reference_upload"] == "storage"


async def test_storage_upload_falls_back_to_gcs_when_the_cdn_fails(fake):
    fake.scenario.errors["cdn_upload"] = FakeError(500, {"detail": "cdn down"})
    job, _ = make_job(references=[png_reference()], reference_image={"uri": "data:,x"})
    await render(make_generator(fake, LIGHTNING_I2I, upload="storage"), job)
    assert submitted(fake)["image_url"].startswith(f"{fake.base_url}/files/gcs-")
    assert fake.requests("PUT", "/uploads/")[0].body == png_reference().data


@pytest.mark.parametrize(("threshold", "mode"), [(10, "storage"), (10_000_000, "data_uri")])
async def test_auto_upload_picks_by_size(fake, threshold, mode):
    job, _ = make_job(references=[png_reference()], reference_image={"uri": "data:,x"})
    result = await render(make_generator(fake, FLUX_I2I, upload="auto", upload_threshold_bytes=threshold), job)
    assert result.applied["reference_upload"] == mode


async def test_url_delivery_passes_urls_through(fake):
    result = await render(make_generator(fake, SCHNELL), make_job(delivery="url", output_format="jpeg")[0])
    (image,) = result.images
    assert image.url is not None and image.url.startswith(f"{fake.base_url}/files/") and image.data is None
    assert (image.format, image.width, image.height) == ("jpeg", 8, 8)
    assert not fake.requests("GET", "/files/")


def fal_manager(fake: FakeFal) -> GeneratorManager:
    """Overrides reach a generator through the manager, which builds a config per override set."""
    config = FalConfig(endpoint=LIGHTNING, poll_interval_s=0.01, **fake.hosts())
    return GeneratorManager(
        {"falai": config},
        default="falai",
        factory=lambda name, cfg: FalGenerator(cfg, name=name, environ={"FAL_KEY": fake.scenario.key}),
    )


async def test_request_overrides_apply_only_overridable_knobs(fake):
    manager = fal_manager(fake)
    with pytest.raises(InvalidRequest, match="endpoint"):
        manager.validate_overrides("falai", {"num_inference_steps": 2, "endpoint": "evil/model"})
    async with manager:
        result = await manager.generate("falai", make_job(generator_config={"num_inference_steps": 2})[0])
    assert submitted(fake)["num_inference_steps"] == "2" and result.applied["endpoint"] == LIGHTNING


async def test_invalid_override_is_invalid_request(fake):
    async with fal_manager(fake) as manager:
        with pytest.raises(InvalidRequest):
            await manager.generate("falai", make_job(generator_config={"guidance_scale": 2.0})[0])
    assert not fake.jobs


async def test_config_arguments_pass_through(fake):
    await render(make_generator(fake, SCHNELL, arguments={"acceleration": "high"}), make_job()[0])
    assert submitted(fake)["acceleration"] == "high"


# -- refusals and errors ---------------------------------------------------------------------------


async def test_reference_on_text_to_image_endpoint_is_unsupported(fake):
    job, _ = make_job(references=[png_reference()], reference_image={"uri": "data:,x"})
    with pytest.raises(Unsupported):
        await render(make_generator(fake, SCHNELL), job)
    assert not fake.jobs


async def test_flagged_image_is_content_policy(fake):
    fake.scenario.nsfw = [False, True]
    with pytest.raises(ContentPolicy) as info:
        await render(make_generator(fake, SCHNELL), make_job(num_images=2)[0])
    assert "1 of 2" in str(info.value) and info.value.request_id == "r-1"
    assert not fake.requests("GET", "/files/")


ERROR_CASES = {
    "wrong key": (None, GenerationFailed, 401, False),
    "validation": ("submit", FakeError.validation("prompt too odd"), GenerationFailed, 422, False),
    "policy": ("result", FakeError.validation("nsfw", type="content_policy_violation"), ContentPolicy, 422, False),
    "rate limit": ("submit", FakeError(429, {"detail": "slow down"}, {"Retry-After": "7"}), RateLimited, 429, True),
    "server": ("result", FakeError.platform(500, "runner_server_error"), GenerationFailed, 500, True),
    "fal says final": (
        "status",
        FakeError(503, {"detail": "no"}, {"X-Fal-Retryable": "false"}),
        GenerationFailed,
        503,
        False,
    ),
}


@pytest.mark.parametrize("case", ERROR_CASES, ids=list(ERROR_CASES))
async def test_http_errors_map_to_classes(fake, case):
    *setup, cls, status, retryable = ERROR_CASES[case]
    key = None
    if setup == [None]:
        key = "not-the-right-key"
    else:
        stage, error = setup
        fake.scenario.errors[stage] = error
    with pytest.raises(cls) as info:
        await render(make_generator(fake, key=key), make_job()[0])
    error = info.value
    assert type(error) is cls and error.status == status and error.retryable is retryable
    assert error.request_id == "r-1" and error.generator == "falai"
    if case == "rate limit":
        assert error.retry_after == 7.0 and len(fake.requests("POST", "/fal-ai")) == 1  # no hidden retries
    if case == "server":
        assert error.error_type == "runner_server_error"
    if case == "validation":
        assert "prompt: prompt too odd" in str(error)


@pytest.mark.parametrize(
    ("raw", "output"),
    [(b"{not json", None), (None, {"images": []}), (None, {"images": [{"width": 8}]}), (None, ["x"])],
)
async def test_malformed_results_are_generation_failed(fake, raw, output):
    fake.scenario.raw_result, fake.scenario.output = raw, output
    with pytest.raises(GenerationFailed) as info:
        await render(make_generator(fake), make_job()[0])
    assert type(info.value) is GenerationFailed and "malformed" in str(info.value)


async def test_unknown_status_string_is_generation_failed(fake):
    fake.scenario.statuses = [("FAILED", None)]
    with pytest.raises(GenerationFailed, match="malformed"):
        await render(make_generator(fake), make_job()[0])


async def test_key_never_appears_in_errors(fake):
    key = "kid-4242:SECRET-PLANTED-9f8e7d"
    fake.scenario.key = key
    fake.scenario.errors["result"] = FakeError(500, {"detail": f"bad header Authorization: Key {key}"})
    with pytest.raises(GenerationFailed) as info:
        await render(make_generator(fake, key=key), make_job()[0])
    for text in (str(info.value), repr(info.value)):
        assert "SECRET-PLANTED" not in text and "kid-4242" not in text
    assert "***" in str(info.value)


async def test_unreachable_fal_is_retryable(fake):
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(GenerationFailed) as info:
        await render(make_generator(fake, queue_url=f"http://127.0.0.1:{port}"), make_job()[0])
    assert info.value.retryable and fake.scenario.key not in str(info.value)
    assert not fake.requests()


# -- cancellation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cancel_error", [None, FakeError(500, {"detail": "cannot cancel"})])
async def test_cancel_puts_cancel_and_reraises(fake, cancel_error):
    fake.scenario.hang_at_poll = 1
    if cancel_error is not None:
        fake.scenario.errors["cancel"] = cancel_error
    generator = make_generator(fake)
    async with generator:
        task = asyncio.create_task(generator.generate(make_job()[0]))
        assert await asyncio.to_thread(fake.hanging.wait, DEADLINE)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(DEADLINE):
                await task
        (put,) = fake.requests("PUT")
        assert put.path.endswith("/requests/req-0001/cancel")
        assert fake.jobs["req-0001"].cancelled.is_set() is (cancel_error is None)


async def test_cancel_during_submit_still_cancels_the_remote_request(fake):
    fake.scenario.submit_delay_s = 0.2
    generator = make_generator(fake)
    async with generator:
        task = asyncio.create_task(generator.generate(make_job()[0]))
        assert await asyncio.to_thread(fake.submitting.wait, DEADLINE)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(DEADLINE):
                await task
    assert [r.path for r in fake.requests("PUT")] == ["/fal-ai/fast-lightning-sdxl/requests/req-0001/cancel"]
    assert not fake.requests("GET")  # no status poll after the cancellation


# -- lifecycle, health, config ---------------------------------------------------------------------


async def test_missing_key_is_unavailable_even_with_ambient_fal_key(fake, monkeypatch):
    monkeypatch.setenv("FAL_KEY", fake.scenario.key)  # ambient key must not be used
    generator = FalGenerator(FalConfig(endpoint=LIGHTNING, api_key_env="MY_FAL_KEY"), environ={})
    with pytest.raises(GeneratorUnavailable, match="MY_FAL_KEY"):
        await generator.open()


async def test_aclose_closes_clients_and_is_idempotent(fake):
    generator = make_generator(fake)
    await render(generator, make_job()[0])  # render() opens and closes
    await generator.aclose()
    with pytest.raises(RuntimeError, match="not open"):
        await generator.generate(make_job()[0])


async def test_aclose_closes_both_clients(fake):
    generator = make_generator(fake)
    async with generator:
        await generator.generate(make_job()[0])
        clients = (generator._api, generator._http)
        assert all(client is not None and not client.is_closed for client in clients)
    assert all(client.is_closed for client in clients)


@pytest.mark.parametrize(
    ("mode", "key", "ok", "words"),
    [
        ("storage_token", None, True, "key accepted"),
        ("storage_token", "wrong-key-value", False, "rejected"),
        ("key", None, True, "not verified"),
        ("key", "", False, "no API key"),
    ],
)
async def test_health(fake, mode, key, ok, words):
    generator = make_generator(fake, health_check=mode, key=key)
    report = await generator.health()
    assert report.ok is ok and words in report.detail
    assert fake.scenario.key not in report.detail and (key is None or not key or key not in report.detail)


def test_steps_map_to_nearest_allowed_value():
    lightning = KNOWN_ENDPOINTS[LIGHTNING]
    assert [map_steps(s, lightning) for s in (1, 3, 5, 6, 7, 100)] == [1, 4, 4, 8, 8, 8]
    assert [map_steps(s, KNOWN_ENDPOINTS[SCHNELL]) for s in (1, 4, 13)] == [1, 4, 12]


def test_known_endpoint_capabilities():
    t2i, i2i = KNOWN_ENDPOINTS[LIGHTNING].capabilities(), KNOWN_ENDPOINTS[FLUX_I2I].capabilities()
    assert t2i.text_to_image and not t2i.image_to_image and t2i.max_reference_images == 0
    assert t2i.parameters == {"seed", "steps"} and t2i.max_images == 8
    assert i2i.image_to_image and not i2i.text_to_image and i2i.max_reference_images == 1
    assert i2i.parameters == {"seed", "steps", "guidance_scale", "strength"}


@pytest.mark.parametrize(
    "fields",
    [
        {"endpoint": LIGHTNING, "guidance_scale": 2.0},
        {"endpoint": FLUX_I2I, "image_size": "square"},
        {"endpoint": SCHNELL, "strength": 0.5},
        {"endpoint": SCHNELL, "arguments": {"prompt": "x"}},
        {"endpoint": "not an endpoint"},
        {"endpoint": SCHNELL, "upload": "ftp"},
    ],
)
def test_config_refuses_what_the_endpoint_cannot_take(fields):
    with pytest.raises(ValidationError):
        FalConfig(**fields)


def test_unknown_endpoint_gets_generic_or_configured_spec():
    generic = FalGenerator(FalConfig(endpoint="someone/new-model"))
    assert generic.capabilities.text_to_image and generic.capabilities.parameters == {"seed"}
    custom = validate_generator_config(
        "custom",
        {
            "strategy": "fal",
            "endpoint": "someone/new-model/edit",
            "endpoint_spec": {"text_to_image": False, "image_to_image": True, "strength": True},
        },
    )
    assert isinstance(custom, FalConfig) and custom.spec == EndpointSpec(
        text_to_image=False, image_to_image=True, strength=True
    )
    assert FalConfig.OVERRIDABLE == {
        "num_inference_steps",
        "guidance_scale",
        "strength",
        "image_size",
        "enable_safety_checker",
        "output_format",
    }
