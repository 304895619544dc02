"""Each cloud strategy end to end: RenderClient -> real ZMQ sockets -> ImageService -> strategy -> fake provider.

The strategies are built by the manager's ``factory`` with a test ``environ`` holding planted keys;
every test also checks that no planted key reaches any published event (seen by a catch-all SUB)
or any log record (DEBUG and up, third-party loggers included).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from image_server.client import RenderFailed, RenderResult
from image_server.generators.base import Generator, GeneratorConfig
from image_server.generators.registry import get_generator_class
from schemas import ImageReady, ImageSource, RenderError, RenderProgress, decode_frames
from tests.fakes.cloudflare import FakeCloudflare
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.fal import FakeError, FalScenario, serve_fal
from tests.fakes.gemini import FakeGemini
from tests.fakes.invokeai import FakeInvokeAI
from tests.fakes.kie import EDIT_MODEL, FakeKie
from tests.fakes.leonardo import FakeLeonardo
from tests.fakes.openai import fake_openai, moderation_blocked, rate_limited
from tests.fakes.runpod import FakeRunPod
from tests.fakes.runware import FakeRunware

DEADLINE = 10.0
FAL_KEY = "planted-fal-key-id:planted-fal-secret-e2e"  # fal keys are "key_id:key_secret"
OPENAI_KEY = "sk-planted-openai-e2e-0123456789"
GEMINI_KEY = "planted-gemini-key-e2e-0123456789"
CF_TOKEN = "planted-cloudflare-token-e2e"
CF_ACCOUNT = "plantedaccount0123456789abcdef"
KIE_KEY = "planted-kie-key-e2e-0123456789"
LEONARDO_KEY = "0d5e9f3a-planted-leonardo-e2e-key"
RUNWARE_KEY = "planted-runware-key-e2e-0123456789"
INVOKE_TOKEN = "planted-invokeai-proxy-token-e2e"  # a reverse proxy's token in front of InvokeAI
RUNPOD_KEY = "rp-planted-runpod-key-e2e-0123456789"
EXAMPLE_WORKFLOWS = Path(__file__).resolve().parents[2] / "examples" / "workflows"
SD15_TABLE = {
    "workflows_dir": str(EXAMPLE_WORKFLOWS),
    "workflows": {
        "sd15": {
            "file": "sd15_text_to_image.json",
            "inputs": {"prompt": "6.inputs.text", "seed": "3.inputs.seed", "steps": "3.inputs.steps"},
            "outputs": ["9"],
        }
    },
    "styles": {"noir": {"lora": "noir.safetensors", "cinematic": "cinematic.safetensors"}},
}
MUTED_LOGGERS = ("httpx", "httpcore")  # below WARNING, by image_server.cli's logging setup


@dataclass
class Served:
    """A running fake provider and the generator table and environment that point at it."""

    name: str
    table: dict[str, Any]
    environ: dict[str, str]
    secrets: tuple[str, ...]  # may appear in no event and no log record at all
    fake: Any
    # Not credentials, but kept out of messages all the same; httpx logs request URLs (with the
    # account id in the path) at INFO, which image_server.cli mutes (httpx and httpcore at WARNING).
    identifiers: tuple[str, ...] = ()
    others: dict[str, dict[str, Any]] = field(default_factory=dict)  # more generators (fallbacks)


@contextlib.contextmanager
def serve(provider: str, **table: Any) -> Iterator[Served]:
    """Start ``provider``'s fake; ``table`` adds to (or replaces) the generator's config fields."""
    base: dict[str, Any] = {"retries": 0, "timeout_s": DEADLINE}
    if provider == "fal":
        with serve_fal(FalScenario(key=FAL_KEY)) as fake:
            fields = {"strategy": "fal", "endpoint": "fal-ai/fast-lightning-sdxl", "poll_interval_s": 0.01}
            fields |= fake.hosts()
            yield Served("falai", base | fields | table, {"FAL_KEY": FAL_KEY}, (FAL_KEY, *FAL_KEY.split(":")), fake)
    elif provider == "openai":
        with fake_openai(api_key=OPENAI_KEY) as fake:
            fields = {"strategy": "openai", "model": "gpt-image-2", "base_url": fake.base_url}
            yield Served("openai", base | fields | table, {"OPENAI_API_KEY": OPENAI_KEY}, (OPENAI_KEY,), fake)
    elif provider == "kie":
        with FakeKie(api_key=KIE_KEY) as fake:
            fields = {"strategy": "kie", "base_url": fake.url, "upload_base_url": fake.url}
            fields |= {"poll_interval_s": 0.01, "poll_max_interval_s": 0.05}
            yield Served("kie", base | fields | table, fake.environ, (KIE_KEY,), fake)
    elif provider == "gemini":
        with FakeGemini(api_key=GEMINI_KEY) as fake:
            fields = {"strategy": "gemini", "base_url": fake.url}
            yield Served("gemini", base | fields | table, fake.environ, (GEMINI_KEY,), fake)
    elif provider == "leonardo":
        with FakeLeonardo(api_key=LEONARDO_KEY) as fake:
            fields = {"strategy": "leonardo", "base_url": fake.base_url, "poll_interval_s": 0.01}
            yield Served("leonardo", base | fields | table, fake.environ, (LEONARDO_KEY,), fake)
    elif provider == "runware":
        with FakeRunware(api_key=RUNWARE_KEY) as fake:
            fields = {"strategy": "runware", "base_url": fake.base_url, "poll_interval_s": 0.01}
            yield Served("runware", base | fields | table, fake.environ, (RUNWARE_KEY,), fake)
    elif provider == "invokeai":
        with FakeInvokeAI(token=INVOKE_TOKEN) as fake:
            fields = {
                "strategy": "invokeai",
                "base_url": fake.url,
                "model": "Juggernaut XL v9",
                "token_env": "INVOKE_TOKEN",
            }
            fields |= {"poll_interval_s": 0.01, "poll_max_interval_s": 0.05}
            yield Served("invokeai", base | fields | table, {"INVOKE_TOKEN": INVOKE_TOKEN}, (INVOKE_TOKEN,), fake)
    elif provider == "comfyui":
        with FakeComfyUI() as fake:
            fields = {"strategy": "comfyui", "base_url": fake.url, "poll_interval_s": 0.02} | SD15_TABLE
            yield Served("comfy", base | fields | table, {}, (), fake)
    elif provider == "runpod":
        with FakeRunPod(api_key=RUNPOD_KEY) as fake:
            fields = {"strategy": "runpod", "endpoint_id": fake.endpoint_id, "base_url": fake.url} | SD15_TABLE
            fields |= {"poll_interval_s": 0.01, "poll_max_interval_s": 0.05}
            yield Served("runpod", base | fields | table, fake.environ, (RUNPOD_KEY,), fake)
    else:
        with FakeCloudflare(api_token=CF_TOKEN, account_id=CF_ACCOUNT) as fake:
            fields = {"strategy": "cloudflare", "base_url": fake.base_url}
            yield Served("cloudflare", base | fields | table, fake.environ, (CF_TOKEN,), fake, (CF_ACCOUNT,))


def factory_with(environ: dict[str, str]) -> Callable[[str, GeneratorConfig], Generator]:
    """The manager's factory, but each strategy reads its keys from ``environ``, not os.environ."""

    def factory(name: str, config: GeneratorConfig) -> Generator:
        return get_generator_class(config.strategy)(config, name=name, environ=environ)

    return factory


@dataclass
class Outcome:
    request_id: str
    result: RenderResult | None = None
    error: RenderError | None = None
    progress: list[RenderProgress] = field(default_factory=list)  # as the client received them
    tapped: list[Any] = field(default_factory=list)  # every event the catch-all SUB decoded

    @property
    def ready(self) -> ImageReady:
        assert self.result is not None, f"expected ImageReady, got {self.error!r}"
        return self.result.event


@pytest.fixture
def through_service(service_factory, client_for, raw_peer, caplog):
    """``await through_service(served, **request_fields)``: one render through the service's sockets."""
    caplog.set_level(logging.DEBUG)

    async def run(served: Served, request_id: str = "e2e-1", **fields: Any) -> Outcome:
        outcome = Outcome(request_id)
        raw: list[list[bytes]] = []
        generators = {served.name: served.table, **served.others}
        factory = factory_with(served.environ)
        async with service_factory(generators=generators, default_generator=served.name, factory=factory) as service:
            peer = await raw_peer(service)
            terminal = asyncio.get_running_loop().create_future()

            async def tap() -> None:
                while True:
                    frames = await peer.sub.recv_multipart()
                    raw.append(frames)
                    message = decode_frames(frames).message
                    outcome.tapped.append(message)
                    is_terminal = isinstance(message, ImageReady | RenderError)
                    if is_terminal and message.request_id == request_id and not terminal.done():
                        terminal.set_result(message)

            def on_event(event: Any) -> None:
                if isinstance(event, RenderProgress):
                    outcome.progress.append(event)

            tapping = asyncio.create_task(tap())
            try:
                async with client_for(service, on_event=on_event) as client:
                    try:
                        outcome.result = await client.render(
                            request_id=request_id, generator=served.name, timeout=DEADLINE, **fields
                        )
                    except RenderFailed as exc:
                        outcome.error = exc.event
                async with asyncio.timeout(DEADLINE):  # the tap has seen everything up to the terminal event
                    await terminal
            finally:
                tapping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await tapping
        # After shutdown, so the closing log lines are checked too.
        assert request_id in caplog.text, "the service logged nothing about the request: the log check is void"
        wire, logs = b"".join(b"".join(frames) for frames in raw), caplog.text
        for secret in served.secrets + served.identifiers:
            assert secret.encode() not in wire, f"a planted secret was published: {secret!r}"
        for secret in served.secrets:
            assert secret not in logs, f"a planted secret was logged: {secret!r}"
        shown = [r for r in caplog.records if r.levelno >= logging.WARNING or not r.name.startswith(MUTED_LOGGERS)]
        for identifier in served.identifiers:
            assert not [r for r in shown if identifier in caplog.handler.format(r)], f"{identifier!r} was logged"
        return outcome

    return run


def assert_stored_image(event: ImageReady) -> Image.Image:
    """The first image is a real, decodable file whose hash and size the event reports."""
    image = event.images[0]
    path = Path(image.path or "")
    assert path.is_file() and image.uri == path.as_uri()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == image.sha256
    with Image.open(path) as opened:
        opened.load()
        assert (opened.width, opened.height) == (image.width, image.height)
        assert (opened.format or "").lower() == image.format
        return opened.copy()


def png_data_uri(side: int = 32) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (10, 200, 30)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# -- success, one per provider ------------------------------------------------------------------------


async def test_fal_text_to_image_with_progress(through_service):
    # Polls are >= 30 ms apart, so IN_PROGRESS (the sixth poll) comes >= 150 ms after anything the
    # service published before it: past its 100 ms progress throttle, so it is always published.
    statuses = [("IN_QUEUE", 0)] * 5 + [("IN_PROGRESS", None), ("COMPLETED", None)]
    with serve("fal", poll_interval_s=0.03) as served:
        served.fake.scenario.statuses = statuses
        outcome = await through_service(served, prompt="a red fox", seed=7, steps=3, negative_prompt="blur")
        (job,) = served.fake.jobs.values()
    event = outcome.ready
    assert event.generator == "falai" and event.attempts == 1
    assert_stored_image(event)
    assert job.arguments["seed"] == 7 and job.arguments["num_inference_steps"] == "4"
    assert event.applied["seed"] == 7 and event.applied["steps"] == 4
    assert event.applied["endpoint"] == "fal-ai/fast-lightning-sdxl"
    assert event.ignored == ["negative_prompt"]  # fast-lightning-sdxl has no negative prompt
    generating = [p for p in outcome.progress if p.stage == "generating"]
    assert "generating" in [p.message for p in generating], outcome.progress
    assert all(p.generator == "falai" for p in generating)
    # fal's queue position reaches the client (the first provider update always passes the throttle).
    assert (generating[0].message, generating[0].queue_position) == ("queued at fal, position 0", 0)
    assert all(p.queue_position is None for p in generating if p.message != "queued at fal, position 0")


async def test_fal_image_to_image_with_a_data_uri_reference(through_service):
    reference = ImageSource(uri=png_data_uri())
    with serve("fal", endpoint="fal-ai/fast-lightning-sdxl/image-to-image", upload="data_uri") as served:
        outcome = await through_service(served, prompt="make it blue", reference_image=reference, strength=0.6)
        (job,) = served.fake.jobs.values()
    event = outcome.ready
    assert_stored_image(event)
    sent = job.arguments["image_url"]
    assert sent.startswith("data:image/") and ";base64," in sent
    with Image.open(io.BytesIO(base64.b64decode(sent.partition(",")[2]))) as uploaded:
        assert uploaded.size == (32, 32)
    assert job.arguments["strength"] == 0.6
    assert event.applied["strength"] == 0.6 and event.applied["reference_upload"] == "data_uri"
    assert event.ignored == []


async def test_openai_text_to_image(through_service):
    with serve("openai") as served:
        outcome = await through_service(served, prompt="a lighthouse", width=1536, height=1000, seed=3)
        (call,) = served.fake.api_requests("/v1/images/generations")
    event = outcome.ready
    assert event.generator == "openai"
    image = assert_stored_image(event)
    assert image.size == (12, 7)  # the fake answers 1/128 of the size it was asked for
    assert call.json()["size"] == "1536x992" and call.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert event.applied["size"] == "1536x992" and event.applied["height"] == 992  # multiples of 16, area kept
    assert event.ignored == ["seed"]  # the Images API has no seed


async def test_gemini_text_to_image(through_service):
    with serve("gemini") as served:
        outcome = await through_service(served, prompt="a teapot", width=1600, height=900, negative_prompt="x")
        (call,) = served.fake.requests
    event = outcome.ready
    assert event.generator == "gemini"
    assert_stored_image(event)
    assert call.headers["x-goog-api-key"] == GEMINI_KEY and GEMINI_KEY not in call.path
    assert call.json()["generationConfig"]["imageConfig"] == {"aspectRatio": "16:9"}
    assert event.applied["aspect_ratio"] == "16:9" and event.applied["model"] == "gemini-2.5-flash-image"
    assert event.ignored == ["negative_prompt"]


async def test_cloudflare_text_to_image(through_service):
    with serve("cloudflare") as served:
        outcome = await through_service(served, prompt="a canyon", steps=30, seed=9, width=512)
        (call,) = served.fake.requests
    event = outcome.ready
    assert event.generator == "cloudflare"
    assert_stored_image(event)
    assert call.json() == {"prompt": "a canyon", "steps": 8, "seed": 9}  # steps clamped to the model's maximum
    assert event.applied["steps"] == 8 and event.applied["steps_requested"] == 30 and event.applied["seed"] == 9
    assert event.ignored == ["width"]  # flux-1-schnell makes its own size


async def test_kie_text_to_image_with_progress(through_service):
    # Each state lasts five polls of >= 30 ms: past the service's 100 ms progress throttle.
    with serve("kie", poll_interval_s=0.03, poll_backoff=1.0) as served:
        served.fake.polls_per_state = 5
        outcome = await through_service(served, prompt="a paper crane", width=1600, height=900, seed=5, steps=9)
        (create,) = served.fake.paths("/api/v1/jobs/createTask")
    event = outcome.ready
    assert event.generator == "kie"
    image = assert_stored_image(event)
    assert image.size == (16, 9)  # the fake renders 1/128 of landscape_16_9 at 2K (2048x1152)
    assert create.json()["input"] == {
        "prompt": "a paper crane",
        "image_size": "landscape_16_9",
        "image_resolution": "2K",
        "max_images": 1,
        "seed": 5,
    }
    assert event.applied["image_size"] == "landscape_16_9" and event.applied["image_resolution"] == "2K"
    assert event.images[0].seed == 5 and event.ignored == ["steps"]
    messages = [p.message for p in outcome.progress if p.stage == "generating"]
    assert "generating" in messages, outcome.progress


async def test_kie_edit_uploads_a_data_uri_reference(through_service):
    with serve("kie") as served:
        outcome = await through_service(served, prompt="paint it", reference_image=ImageSource(uri=png_data_uri()))
        (upload,) = served.fake.paths("/api/file-base64-upload")
        (create,) = served.fake.paths("/api/v1/jobs/createTask")
        files = dict(served.fake.files)
    event = outcome.ready
    assert_stored_image(event)
    assert create.json()["model"] == EDIT_MODEL
    (url,) = create.json()["input"]["image_urls"]
    with Image.open(io.BytesIO(files[url.removeprefix(served.fake.url)][0])) as uploaded:
        assert uploaded.size == (32, 32)  # the very reference the client sent
    assert upload.json()["base64Data"].startswith("data:image/png;base64,")
    assert event.applied["reference_uploads"] == 1 and event.applied["model"] == EDIT_MODEL


async def test_kie_out_of_credits_falls_back_to_cloudflare_flux(through_service):
    """The seed project's pair: Kie first; its 402 (sent on HTTP 200) is final, so Cloudflare renders."""
    with FakeCloudflare(api_token=CF_TOKEN, account_id=CF_ACCOUNT) as cloudflare:
        flux = {"strategy": "cloudflare", "base_url": cloudflare.base_url, "retries": 1}
        with serve("kie", fallbacks=["cloudflare_flux"], retries=2) as served:
            served.others["cloudflare_flux"] = flux
            served.environ.update(cloudflare.environ)
            served.fake.errors["create"].append((402, "Credits insufficient"))
            outcome = await through_service(served, prompt="a harbour")
            creates = served.fake.paths("/api/v1/jobs/createTask")
    event = outcome.ready
    assert event.generator == "cloudflare_flux" and event.attempts == 2  # 402 was not retried
    assert len(creates) == 1 and len(cloudflare.requests) == 1
    assert_stored_image(event)


async def test_leonardo_image_to_image_with_an_element(through_service):
    element = "b1a2c3d4-0000-4000-8000-0000000000e2"
    with serve("leonardo") as served:
        outcome = await through_service(
            served,
            prompt="a harbour at night",
            reference_image=ImageSource(uri=png_data_uri()),
            strength=0.25,
            width=640,
            seed=8,
            loras=[{"name": element, "strength": 0.5}],
            style="cinematic",
        )
        (create,) = served.fake.calls("POST", "/generations")
        (image,) = served.fake.init_images.values()
    event = outcome.ready
    assert event.generator == "leonardo"
    assert_stored_image(event)
    body = create.json()
    assert body["init_image_id"] == image.id and body["init_strength"] == 0.75
    assert body["elements"] == [{"akUUID": element, "weight": 0.5}] and body["presetStyle"] == "CINEMATIC"
    with Image.open(io.BytesIO(image.data or b"")) as uploaded:  # the reference reached the S3 bucket intact
        assert uploaded.size == (32, 32)
    assert event.applied["init_strength"] == 0.75 and event.applied["width"] == 640 and event.applied["seed"] == 8
    assert event.ignored == []


async def test_runware_image_to_image_with_a_lora(through_service):
    lora = "civitai:58390@62833"
    with serve("runware") as served:
        outcome = await through_service(
            served,
            prompt="a fox, watercolour",
            reference_image=ImageSource(uri=png_data_uri()),
            strength=0.6,
            width=900,
            height=500,
            output_format="webp",
            loras=[{"name": lora, "strength": 0.9}],
            style="anything",
        )
        (task,) = served.fake.tasks("imageInference")
        (uploaded,) = served.fake.uploads.values()
    event = outcome.ready
    assert event.generator == "runware"
    assert_stored_image(event)
    assert event.images[0].format == "webp"  # asked of Runware as outputFormat
    assert task["seedImage"] in served.fake.uploads and task["strength"] == 0.6
    assert (task["width"], task["height"], task["outputFormat"]) == (896, 512, "WEBP")
    assert task["lora"] == [{"model": lora, "weight": 0.9}]
    with Image.open(io.BytesIO(uploaded)) as reference:
        assert reference.size == (32, 32)
    assert event.applied["width"] == 896 and event.applied["lora"] == [{"model": lora, "weight": 0.9}]
    assert event.ignored == ["style"]


async def test_invokeai_image_to_image_with_a_lora_on_the_project_board(through_service):
    reference = ImageSource(uri=png_data_uri(64))
    # In progress for >= 8 polls >= 30 ms apart: longer than the service's 100 ms progress throttle.
    with serve("invokeai", poll_interval_s=0.03) as served:
        served.fake.running_polls = 8
        outcome = await through_service(
            served,
            prompt="a castle",
            reference_image=reference,
            strength=0.5,
            seed=77,
            loras=[{"name": "Pixel Art XL", "strength": 0.7}],
            project="castles",
            width=1024,
            height=768,
        )
        fake = served.fake
        (batch,) = fake.batches
    event = outcome.ready
    assert event.generator == "invokeai"
    image = assert_stored_image(event)
    assert image.size == (1024, 768)
    nodes = batch["graph"]["nodes"]
    assert nodes["lora_1"]["type"] == "sdxl_lora_loader" and nodes["lora_1"]["weight"] == 0.7
    assert nodes["output"]["board"]["board_id"] in fake.boards and list(fake.boards.values()) == ["castles"]
    assert event.applied["loras"] == [{"name": "Pixel Art XL", "strength": 0.7}]
    assert event.applied["seed"] == 77 and event.applied["strength"] == 0.5 and event.applied["board"] == "castles"
    assert event.images[0].seed == 77 and event.ignored == []
    assert "generating" in [p.message for p in outcome.progress]


async def test_invokeai_model_chosen_per_request(through_service):
    with serve("invokeai") as served:
        outcome = await through_service(
            served, prompt="a comet", generator_config={"model": "FLUX Schnell (Quantized)"}, negative_prompt="x"
        )
        (batch,) = served.fake.batches
    assert batch["graph"]["nodes"]["model_loader"]["type"] == "flux_model_loader"
    assert outcome.ready.applied["base"] == "flux" and outcome.ready.ignored == ["negative_prompt"]


async def test_invokeai_timeout_cancels_the_queue_item(through_service):
    with serve("invokeai") as served:
        served.fake.hold = True  # the item stays in progress until it is cancelled
        outcome = await through_service(served, prompt="slow", timeout_s=0.5)
        cancelled = served.fake.cancelled
    assert outcome.error is not None and outcome.error.code == "timeout"
    assert cancelled == [1]


# -- errors, one class per case; secrets are checked by the fixture ------------------------------------


def fal_rate_limited(fake: Any) -> None:
    fake.scenario.errors["submit"] = FakeError(429, {"detail": "Too many requests"}, {"Retry-After": "5"})


def fal_flagged(fake: Any) -> None:
    fake.scenario.nsfw = True


def openai_rate_limited(fake: Any) -> None:
    fake.fail_next(rate_limited("7"))


def openai_moderation(fake: Any) -> None:
    fake.fail_next(moderation_blocked())


def openai_wrong_key(fake: Any) -> None:
    fake.api_key = "sk-some-other-key"  # the fake's 401 then echoes the planted key in full


def kie_no_credits(fake: Any) -> None:
    fake.errors["create"].append((402, "Credits insufficient"))  # on HTTP 200, code in the body


def kie_refused(fake: Any) -> None:
    fake.fail = ("400", "The content you submitted may contain sensitive information")


def kie_echo_key(fake: Any) -> None:
    fake.mirror_status, fake.echo_key = True, True
    fake.errors["poll"].extend([(500, "Server Error for")] * 5)


def invokeai_oom(fake: Any) -> None:
    fake.fail_with = ("OutOfMemoryError", "CUDA out of memory")


def invokeai_echoes_the_token(fake: Any) -> None:
    fake.fail_with = ("HTTPError", f"proxy refused header 'Bearer {INVOKE_TOKEN}'")


def invokeai_nonsense(fake: Any) -> None:
    fake.nonsense = {"enqueue"}


def invokeai_missing_model(fake: Any) -> None:
    fake.models.remove("k-sdxl")


def scenario(name: str) -> Callable[[Any], None]:
    def apply(fake: Any) -> None:
        fake.scenario = name

    apply.__name__ = name
    return apply


@pytest.mark.parametrize(
    ("provider", "arrange", "code", "retryable"),
    [
        ("fal", fal_rate_limited, "rate_limited", True),
        ("fal", fal_flagged, "content_policy", False),
        ("openai", openai_rate_limited, "rate_limited", True),
        ("openai", openai_moderation, "content_policy", False),
        ("openai", openai_wrong_key, "generation_failed", False),
        ("gemini", scenario("rate_limit"), "rate_limited", True),
        ("gemini", scenario("prompt_block"), "content_policy", False),
        ("gemini", scenario("echo_key"), "generation_failed", True),
        ("cloudflare", scenario("capacity"), "rate_limited", True),
        ("cloudflare", scenario("nsfw"), "content_policy", False),
        ("cloudflare", scenario("echo_secrets"), "generation_failed", True),
        ("kie", kie_no_credits, "generation_failed", False),
        ("kie", kie_refused, "content_policy", False),
        ("kie", kie_echo_key, "generation_failed", True),
        ("leonardo", scenario("rate_limited"), "rate_limited", True),
        ("leonardo", scenario("nsfw"), "content_policy", False),
        ("leonardo", scenario("echo_key"), "generation_failed", True),
        ("runware", scenario("rate_limited"), "rate_limited", True),
        ("runware", scenario("no_credits"), "generation_failed", False),
        ("runware", scenario("echo_key"), "generation_failed", True),
        ("runware", scenario("task_error"), "generation_failed", False),
        ("invokeai", invokeai_oom, "generation_failed", False),
        ("invokeai", invokeai_echoes_the_token, "generation_failed", False),
        ("invokeai", invokeai_nonsense, "generation_failed", False),
        ("invokeai", invokeai_missing_model, "invalid_request", False),
    ],
    ids=lambda value: getattr(value, "__name__", None) if callable(value) else None,
)
async def test_provider_errors_through_the_service(through_service, provider, arrange, code, retryable):
    with serve(provider) as served:
        arrange(served.fake)
        outcome = await through_service(served, prompt="anything")
    error = outcome.error
    assert error is not None and outcome.result is None
    assert (error.code, error.retryable, error.generator) == (code, retryable, served.name)
    assert error.attempts == 1  # retries = 0: a retryable error is not tried again
    assert error in outcome.tapped  # the catch-all subscriber saw the very event the client got


# -- self-hosted and serverless workflow strategies ---------------------------------------------------


async def test_comfyui_workflow_with_a_style_lora_stack_and_progress(through_service):
    with serve("comfyui") as served:
        served.fake.render_s = 0.5  # progress events >= 100 ms apart pass the service's throttle
        outcome = await through_service(served, prompt="a red fox", seed=11, style="noir")
        (prompt,) = [r.json()["prompt"] for r in served.fake.requests if r.path == "/prompt"]
    event = outcome.ready
    assert assert_stored_image(event).size == (64, 48)
    assert event.applied["loras"] == [
        {"name": "noir.safetensors", "strength": 1.0, "role": "style"},
        {"name": "cinematic.safetensors", "strength": 1.0, "role": "cinematic"},
    ]
    assert prompt["3"]["inputs"]["model"] == ["11", 0] and prompt["3"]["inputs"]["seed"] == 11
    fractions = [p.progress for p in outcome.progress if p.stage == "generating" and p.progress is not None]
    assert fractions and fractions == sorted(fractions) and all(0 < f <= 1 for f in fractions)


async def test_comfyui_execution_error_and_timeout_through_the_service(through_service):
    with serve("comfyui") as served:
        served.fake.fail_node_class = "VAEDecode"
        outcome = await through_service(served, prompt="x")
        assert outcome.error is not None and outcome.error.code == "generation_failed"
        assert "CUDA out of memory" in outcome.error.message and "SECRET_TRACEBACK" not in outcome.error.message
        served.fake.fail_node_class, served.fake.render_s = None, 30.0
        outcome = await through_service(served, request_id="e2e-2", prompt="x", timeout_s=0.5)
        assert outcome.error is not None and outcome.error.code == "timeout"
        async with asyncio.timeout(DEADLINE):
            while not served.fake.interrupts:
                await asyncio.sleep(0.01)
        timed_out = [r.json()["prompt_id"] for r in served.fake.requests if r.path == "/prompt"][-1]
        assert served.fake.interrupts == [{"prompt_id": timed_out}]  # that prompt only, never a global interrupt


async def test_runpod_job_timings_reach_image_ready(through_service):
    with serve("runpod") as served:
        outcome = await through_service(
            served, prompt="a red fox", loras=[{"name": "fox.safetensors", "strength": 0.5}]
        )
        (job,) = served.fake.jobs.values()
    event = outcome.ready
    assert_stored_image(event)
    assert (event.timings.provider_queue, event.timings.provider_execution) == (1234.0, 5678.0)
    assert event.applied["loras"] == [{"name": "fox.safetensors", "strength": 0.5, "role": "character"}]
    assert job.input["workflow"]["10"]["inputs"]["lora_name"] == "fox.safetensors"


async def test_runpod_failure_through_the_service(through_service):
    with serve("runpod") as served:
        served.fake.outcome = "FAILED"
        outcome = await through_service(served, prompt="x")
    assert outcome.error is not None and outcome.error.code == "generation_failed"
    assert "CUDA error: out of memory" in outcome.error.message and "SECRET_TRACE" not in outcome.error.message


async def test_comfyui_request_picks_another_workflow_with_a_reference_slot(through_service):
    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "workflows"
    workflows = {
        "sd15": {"file": "sd15_text_to_image.json", "inputs": {"prompt": "6.inputs.text"}},
        "i2i": {"file": "sdxl_img2img.json", "inputs": {"reference_images": ["10.inputs.image"]}},
    }
    with serve("comfyui", workflows_dir=str(fixtures), workflows=workflows, workflow="sd15") as served:
        outcome = await through_service(
            served,
            prompt="a red fox",
            reference_images=[ImageSource(image_data=png_data_uri())],
            generator_config={"workflow": "i2i"},
        )
        uploaded = [name for (kind, _, name) in served.fake.files if kind == "input"]
        wrong = await through_service(served, request_id="e2e-2", prompt="x", generator_config={"workflow": "nope"})
    assert outcome.ready.applied["workflow"] == "i2i" and outcome.ready.applied["reference_images"] == 1
    assert uploaded == ["ref1.png"]
    assert wrong.error is not None and wrong.error.code == "invalid_request"
    assert "unknown workflow 'nope'; allowed: i2i, sd15" in wrong.error.message
