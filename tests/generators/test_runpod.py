"""The runpod strategy (worker-comfyui 5.x) against the fake RunPod endpoint."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from image_server.errors import GenerationFailed, GenerationTimeout, RateLimited, ReferenceImageError
from image_server.generators.base import ReferenceImage, RenderJob
from image_server.generators.registry import validate_generator_config
from image_server.generators.runpod import RunPodConfig, RunPodGenerator
from image_server.generators.runpod.wire import poll_delays
from schemas import RenderRequest
from tests.fakes.runpod import FakeRunPod
from tests.generators.test_comfyui import SD15, SDXL_I2I

FIXTURES = Path(__file__).parent.parent / "fixtures" / "workflows"
KEY = "rp-planted-key-0123456789"


@pytest.fixture
def fake():
    with FakeRunPod(api_key=KEY) as server:
        yield server


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURES, tmp_path / "wf")
    return tmp_path / "wf"


def make(fake: FakeRunPod, folder: Path, environ: dict[str, str] | None = None, **fields: Any) -> RunPodGenerator:
    table = {"strategy": "runpod", "endpoint_id": fake.endpoint_id, "base_url": fake.url, "workflows_dir": str(folder)}
    table |= {"workflows": {"sd15": SD15, "sdxl_i2i": SDXL_I2I}, "poll_interval_s": 0.01, "poll_max_interval_s": 0.05}
    config = validate_generator_config("rp", table | fields)
    assert isinstance(config, RunPodConfig)
    return RunPodGenerator(config, name="rp", environ=environ or fake.environ)


def job(progress: list[Any] | None = None, references: list[bytes] = (), **fields: Any) -> RenderJob:  # type: ignore[assignment]
    request = RenderRequest.model_validate({"request_id": "r-1", "prompt": "a harbour at night"} | fields)
    refs = [ReferenceImage(data, "png", *Image.open(io.BytesIO(data)).size) for data in references]
    sink = (lambda f, m: progress.append(m)) if progress is not None else (lambda f, m: None)
    return RenderJob(request, refs, progress=sink)


def png(side: int, noisy: bool = False) -> bytes:
    image = Image.effect_noise((side, side), 90).convert("RGB") if noisy else Image.new("RGB", (side, side), "red")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


async def test_run_then_poll_builds_the_workflow_and_reports_runpod_timings(fake, folder):
    progress: list[Any] = []
    async with make(fake, folder) as generator:
        result = await generator.generate(job(progress, seed=9, steps=7))
    (sent,) = fake.jobs.values()
    graph = sent.input["workflow"]
    assert graph["6"]["inputs"]["text"] == "a harbour at night" and graph["3"]["inputs"]["seed"] == 9
    assert graph["3"]["inputs"]["steps"] == 7 and sent.input["images"] == []
    assert sent.history == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    assert progress == ["queued at RunPod", "running on RunPod"]
    (image,) = result.images
    assert image.data == fake.image() and image.format == "png" and image.seed == 9
    assert result.timings == {"provider_queue": 1234.0, "provider_execution": 5678.0}
    paths = [(r.method, r.path) for r in fake.requests]
    assert paths[0] == ("POST", f"/{fake.endpoint_id}/run")
    assert all(r.headers["Authorization"] == f"Bearer {KEY}" for r in fake.requests)


def test_status_polls_back_off_to_the_configured_maximum():
    delays = poll_delays(1.0, 1.5, 5.0)
    assert [next(delays) for _ in range(7)] == [1.0, 1.5, 2.25, 3.375, 5.0, 5.0, 5.0]
    assert next(poll_delays(9.0, 2.0, 5.0)) == 5.0  # a first wait above the maximum is capped too


async def test_references_travel_in_input_images_and_load_image_takes_their_names(fake, folder):
    async with make(fake, folder, workflow="sdxl_i2i") as generator:
        result = await generator.generate(job(references=[png(16)], strength=0.3))
    (sent,) = fake.jobs.values()
    ((entry),) = sent.input["images"]
    assert entry["name"] == "image_server_r-1_1.png" and base64.b64decode(entry["image"]) == png(16)
    assert sent.input["workflow"]["10"]["inputs"]["image"] == "image_server_r-1_1.png"
    assert sent.input["workflow"]["3"]["inputs"]["denoise"] == 0.3
    assert result.applied["reference_images"] == 1 and "shrunk_references" not in result.applied


@pytest.mark.parametrize("final", [True, False])
async def test_runsync_and_its_fallback_to_polling(fake, folder, final):
    fake.runsync_final = final
    async with make(fake, folder, mode="runsync") as generator:
        result = await generator.generate(job())
    (sent,) = fake.jobs.values()
    assert len(result.images) == 1 and fake.requests[0].path == f"/{fake.endpoint_id}/runsync"
    polls = [r for r in fake.requests if "/status/" in r.path]
    assert len(polls) == (0 if final else 3)


async def test_url_outputs_are_downloaded_without_the_key(fake, folder):
    fake.output = "s3_url"
    async with make(fake, folder) as generator:
        result = await generator.generate(job())
    assert result.images[0].data == fake.image()
    (download,) = [r for r in fake.requests if r.path.startswith("/files/")]
    assert "Authorization" not in download.headers


async def test_legacy_workers_message_output_is_decoded(fake, folder):
    fake.output = "legacy"
    async with make(fake, folder) as generator:
        assert (await generator.generate(job())).images[0].data == fake.image()


@pytest.mark.parametrize(
    ("outcome", "output", "error", "match"),
    [
        ("COMPLETED", "no_images", GenerationFailed, "the workflow ran but produced no images"),
        ("COMPLETED", "garbage", GenerationFailed, "malformed base64"),
        ("FAILED", "base64", GenerationFailed, "the RunPod job failed: RuntimeError: CUDA error: out of memory"),
        ("TIMED_OUT", "base64", GenerationTimeout, "timed out on the endpoint"),
        ("CANCELLED", "base64", GenerationFailed, "cancelled on the endpoint"),
    ],
)
async def test_terminal_states_become_clear_errors(fake, folder, outcome, output, error, match):
    fake.outcome, fake.output = outcome, output
    async with make(fake, folder) as generator:
        with pytest.raises(error, match=match) as caught:
            await generator.generate(job())
    assert "SECRET_TRACE" not in str(caught.value) and caught.value.request_id == "r-1"


async def test_a_failed_workflow_reports_the_workers_details(fake, folder):
    fake.outcome = "FAILED"
    fake.failure_details = ["Workflow execution error: Node Type: VAEDecode, Node ID: 8, Message: CUDA out of memory"]
    async with make(fake, folder) as generator:
        with pytest.raises(GenerationFailed) as caught:
            await generator.generate(job())
    assert str(caught.value) == (
        "rp: the RunPod job failed: Job processing failed: "
        "Workflow execution error: Node Type: VAEDecode, Node ID: 8, Message: CUDA out of memory"
    )
    assert not caught.value.retryable


async def test_cancel_cancels_the_runpod_job(fake, folder):
    fake.statuses = ["IN_QUEUE"] * 10_000
    async with make(fake, folder) as generator:
        task = asyncio.create_task(generator.generate(job()))
        async with asyncio.timeout(10):
            while not any(j.polls for j in fake.jobs.values()):
                await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    (sent,) = fake.jobs.values()  # aclose waited for the cancel call
    assert fake.cancels == [sent.id]


async def test_auth_and_rate_limit_errors(fake, folder):
    async with make(fake, folder, environ={"RUNPOD_API_KEY": "wrong-key-123456"}) as generator:
        with pytest.raises(GenerationFailed, match="authentication failed") as caught:
            await generator.generate(job())
        assert not caught.value.retryable and "wrong-key-123456" not in str(caught.value)
    fake.rate_limited = True
    async with make(fake, folder) as generator:
        with pytest.raises(RateLimited) as limited:
            await generator.generate(job())
    assert limited.value.retryable and limited.value.retry_after == 3.0


async def test_an_oversized_payload_is_shrunk_and_reported(fake, folder):
    big = png(900, noisy=True)
    assert len(big) > 1_500_000
    async with make(fake, folder, workflow="sdxl_i2i", max_payload_bytes=1_000_000) as generator:
        result = await generator.generate(job(references=[big]))
    (sent,) = fake.jobs.values()
    assert len(fake.requests[0].body) <= 1_000_000
    assert result.applied["shrunk_references"] == ["image_server_r-1_1.png"]
    assert base64.b64decode(sent.input["images"][0]["image"])[:3] == b"\xff\xd8\xff"  # re-encoded as JPEG


async def test_an_oversized_payload_is_refused_before_sending_when_shrinking_is_off(fake, folder):
    big = png(900, noisy=True)
    async with make(fake, folder, workflow="sdxl_i2i", max_payload_bytes=1_000_000, shrink_references=False) as gen:
        with pytest.raises(
            ReferenceImageError, match=r"over the 1000000-byte RunPod payload limit \(image_server_r-1_1.png"
        ):
            await gen.generate(job(references=[big]))
    assert fake.requests == []


async def test_the_base_url_comes_from_runpods_own_variable_when_unset(fake, folder):
    environ = fake.environ | {"RUNPOD_ENDPOINT_BASE_URL": fake.url}
    async with make(fake, folder, environ=environ, base_url=None) as generator:
        assert len((await generator.generate(job())).images) == 1
        assert (await generator.health()).ok
