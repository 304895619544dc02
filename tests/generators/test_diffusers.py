"""The diffusers strategy end to end: RenderClient -> real ZMQ sockets -> ImageService -> a real
diffusers pipeline (tiny random weights, built once per run by tests/generators/tiny_diffusers.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from image_server.client import RenderClient, RenderFailed, RenderResult
from image_server.config import build_config
from image_server.errors import ConfigError
from image_server.generators.base import Generator, GeneratorConfig, RenderJob
from image_server.generators.diffusers import DiffusersConfig, DiffusersGenerator
from image_server.generators.diffusers.running import Runner
from schemas import ImageSource, RenderError, RenderProgress, RenderRequest
from tests.fakes.images import solid_bytes

DEADLINE = 30.0  # generous: the machine is shared; nothing here waits on it unless it fails
FAST = {"width": 64, "height": 64, "steps": 2}


@dataclass
class Session:
    client: RenderClient
    progress: dict[str, list[RenderProgress]] = field(default_factory=dict)
    generators: list[DiffusersGenerator] = field(default_factory=list)

    def runner(self) -> Runner:
        """The loaded pipeline's runner (the manager also builds unopened instances for capabilities)."""
        (runner,) = [generator._runner for generator in self.generators if generator._runner is not None]
        return runner

    async def render(self, **fields: Any) -> RenderResult:
        return await self.client.render(timeout=DEADLINE, **{"prompt": "a lighthouse", **FAST, **fields})

    async def fail(self, **fields: Any) -> RenderError:
        with pytest.raises(RenderFailed) as failed:
            await self.render(**fields)
        return failed.value.event


@pytest.fixture
def diffusers_service(service_factory, client_for) -> Callable[..., Any]:
    """``async with diffusers_service(model=..., **table) as session:`` one generator named ``local``."""

    @asynccontextmanager
    async def run(*, state_dir: str | None = None, **table: Any) -> AsyncIterator[Session]:
        created: list[DiffusersGenerator] = []

        def factory(name: str, config: GeneratorConfig) -> Generator:
            generator = DiffusersGenerator(config, name=name)
            created.append(generator)
            return generator

        generators = {"local": {"strategy": "diffusers", "retries": 0, "device": "cpu", **table}}
        overrides: dict[str, Any] = {"state_dir": state_dir} if state_dir else {}
        async with service_factory(
            generators=generators, default_generator="local", factory=factory, **overrides
        ) as service:
            progress: dict[str, list[RenderProgress]] = {}

            def on_event(event: Any) -> None:
                if isinstance(event, RenderProgress) and event.stage == "generating":
                    progress.setdefault(event.request_id, []).append(event)

            async with client_for(service, on_event=on_event) as client:
                yield Session(client, progress, created)

    return run


def steps_seen(events: list[RenderProgress]) -> list[tuple[int, int]]:
    pairs = []
    for event in events:
        assert event.message is not None and event.message.startswith("step ")
        done, total = event.message.removeprefix("step ").split("/")
        assert event.progress == pytest.approx(int(done) / int(total))
        pairs.append((int(done), int(total)))
    return pairs


GUIDANCE = {"sd": 7.5, "sdxl": 5.0, "flux": 3.5}  # each family's default


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
async def test_text_to_image_same_seed_same_image(diffusers_service, tiny, family):
    # JPEG: a PNG's text chunks hold the request id, so only same-id PNGs can be byte-identical.
    async with diffusers_service(model=str(getattr(tiny, family))) as session:
        first = await session.render(request_id="a", seed=7, output_format="jpeg", negative_prompt="fog")
        again = await session.render(request_id="b", seed=7, output_format="jpeg", negative_prompt="fog")
        other = await session.render(request_id="c", seed=8, output_format="jpeg")
    image = first.event.images[0]
    assert (image.width, image.height, image.format) == (64, 64, "jpeg")
    assert Path(image.path or "").is_file()
    assert again.event.images[0].sha256 == image.sha256
    assert other.event.images[0].sha256 != image.sha256
    assert first.event.applied == {"width": 64, "height": 64, "seed": 7, "steps": 2, "guidance_scale": GUIDANCE[family]}
    assert ("negative_prompt" in first.event.ignored) == (family == "flux")  # FLUX takes none
    # Progress came from the pipeline's step callback (throttled to 10/s by the service).
    seen = steps_seen(session.progress["a"])
    assert seen and seen == sorted(seen) and {total for _, total in seen} == {2}


async def test_the_same_request_gives_the_same_file_after_a_restart(diffusers_service, tiny, tmp_path):
    """A fresh service (fresh journal, pipeline loaded anew) renders the same PNG, byte for byte."""
    digests = []
    for run in range(2):
        async with diffusers_service(model=str(tiny.sd), state_dir=str(tmp_path / f"state{run}")) as session:
            result = await session.render(request_id="same", seed=11, negative_prompt="fog", guidance_scale=6.0)
            digests.append(result.event.images[0].sha256)
    assert digests[0] == digests[1]


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
async def test_image_to_image_uses_the_first_reference(diffusers_service, tiny, family):
    reference = ImageSource(frame=0)
    async with diffusers_service(model=str(getattr(tiny, family))) as session:
        plain = await session.render(request_id="t2i", seed=3, steps=4)
        red = await session.client.render(
            RenderRequest(request_id="i2i-red", prompt="x", seed=3, steps=4, strength=0.5, reference_image=reference),
            images=[solid_bytes((255, 0, 0), (80, 48))],
            timeout=DEADLINE,
        )
        blue = await session.client.render(
            RenderRequest(request_id="i2i-blue", prompt="x", seed=3, steps=4, strength=0.5, reference_image=reference),
            images=[solid_bytes((0, 0, 255), (80, 48))],
            timeout=DEADLINE,
        )
        # from_pipe: the image-to-image pipeline holds the very same modules, not a copy.
        runner = session.runner()
        i2i, base = runner._variants["i2i"], runner.loaded.pipe
        denoiser = "transformer" if family == "flux" else "unet"
        assert getattr(i2i, denoiser) is getattr(base, denoiser)
        assert i2i.vae is base.vae and i2i.text_encoder is base.text_encoder
    assert red.event.applied["strength"] == 0.5
    # The reference's size (80x48, a multiple of 8) is the output's when the request names none.
    assert (red.event.images[0].width, red.event.images[0].height) == (80, 48)
    assert len({plain.event.images[0].sha256, red.event.images[0].sha256, blue.event.images[0].sha256}) == 3
    # strength 0.5 of 4 steps runs 2 denoising steps, and the progress says so.
    assert {total for _, total in steps_seen(session.progress["i2i-red"])} == {2}


async def test_every_step_reaches_the_job(tiny):
    """Below the service's throttle: the generator reports each step once, in order."""
    config = DiffusersConfig(model=str(tiny.sd), device="cpu")
    calls: list[tuple[float | None, str | None]] = []
    async with DiffusersGenerator(config, name="local") as generator:
        job = RenderJob(RenderRequest(request_id="p", prompt="x", seed=1, **FAST | {"steps": 5}))
        job.progress = lambda fraction, message: calls.append((fraction, message))
        result = await generator.generate(job)
    assert [message for _, message in calls] == [f"step {n}/5" for n in range(1, 6)]
    assert [fraction for fraction, _ in calls] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert result.images[0].seed == 1 and result.images[0].image is not None


async def test_cancel_mid_render_stops_at_the_next_step(diffusers_service, tiny):
    async with diffusers_service(model=str(tiny.sd)) as session:
        render = asyncio.create_task(session.render(request_id="long", steps=200, width=256, height=256))
        async with asyncio.timeout(DEADLINE):
            while not session.progress.get("long"):
                await asyncio.sleep(0.01)
        await session.client.cancel("long")
        with pytest.raises(RenderFailed) as failed:
            await render
        assert failed.value.event.code == "cancelled"
        # It stopped long before its 200 steps, and the pipeline serves the next request at once.
        assert max(done for done, _ in steps_seen(session.progress["long"])) < 200
        after = await session.render(request_id="after")
    assert after.event.images[0].width == 64


async def test_timeout_stops_the_render_and_the_pipeline_stays_usable(diffusers_service, tiny):
    async with diffusers_service(model=str(tiny.sd), preload=True) as session:
        # 200 steps at 256x256 take seconds; the request allows one.
        error = await session.fail(request_id="slow", steps=200, width=256, height=256, timeout_s=1.0)
        after = await session.render(request_id="after")
    assert error.code == "timeout" and error.retryable
    assert max((done for done, _ in steps_seen(session.progress.get("slow", []))), default=0) < 200  # stopped early
    assert after.event.applied["steps"] == 2


async def test_out_of_device_memory_is_retryable_and_the_pipeline_survives(diffusers_service, tiny):
    """The GPU is outside this machine: its allocator's error is raised from the UNet once."""
    async with diffusers_service(model=str(tiny.sd), preload=True, retries=1, retry_backoff_s=0) as session:
        unet = session.runner().loaded.pipe.unet
        raised: list[str] = []

        def out_of_memory(module: Any, args: Any) -> None:
            if not raised:
                raised.append("once")
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

        hook = unet.register_forward_pre_hook(out_of_memory)
        try:
            retried = await session.render(request_id="oom")
        finally:
            hook.remove()
    assert raised == ["once"] and retried.event.attempts == 2


async def test_out_of_memory_without_retries_is_a_clear_retryable_error(diffusers_service, tiny):
    async with diffusers_service(model=str(tiny.sd), preload=True) as session:
        hook = session.runner().loaded.pipe.unet.register_forward_pre_hook(
            lambda module, args: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory."))
        )
        error = await session.fail(request_id="oom")
        hook.remove()
        after = await session.render(request_id="after")
    assert error.code == "generation_failed" and error.retryable
    assert "out of device memory" in error.message
    assert after.event.images[0].width == 64


def test_a_missing_model_folder_fails_at_start_up_naming_it(tmp_path):
    missing = tmp_path / "models" / "sd15"
    with pytest.raises(ConfigError, match=f"model folder {missing} does not exist"):
        build_config({"generators": {"local": {"strategy": "diffusers", "model": str(missing)}}})


async def test_a_repo_id_missing_from_the_cache_is_a_clear_error(diffusers_service, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    async with diffusers_service(model="nobody/no-such-model") as session:
        error = await session.fail(request_id="missing")
    assert error.code == "generation_failed" and not error.retryable
    assert "nobody/no-such-model is neither a folder nor in the Hugging Face cache" in error.message


async def test_a_folder_that_is_not_a_pipeline_is_refused(diffusers_service, tiny):
    async with diffusers_service(model=str(tiny.sd / "unet")) as session:
        error = await session.fail(request_id="not-a-pipeline")
    assert f"{tiny.sd / 'unet'} is not a diffusers pipeline folder (no model_index.json)" in error.message


async def test_a_corrupt_model_folder_is_a_clear_error(diffusers_service, tiny):
    async with diffusers_service(model=str(tiny.corrupt)) as session:
        error = await session.fail(request_id="corrupt")
        again = await session.fail(request_id="corrupt-again")  # no half-loaded pipeline was kept
    assert error.code == "generation_failed" and not error.retryable
    assert f"cannot load the pipeline in {tiny.corrupt}" in error.message
    assert again.message == error.message


async def test_loras_by_name_from_the_folder(diffusers_service, tiny):
    async with diffusers_service(model=str(tiny.sd), lora_dir=str(tiny.loras)) as session:
        plain = await session.render(request_id="plain", seed=5, output_format="jpeg")
        inked = await session.render(
            request_id="inked", seed=5, output_format="jpeg", loras=[{"name": "ink", "strength": 0.8}]
        )
        plain_again = await session.render(request_id="plain-again", seed=5, output_format="jpeg")
        missing = await session.fail(request_id="missing", loras=[{"name": "nope"}])
        escape = await session.fail(request_id="escape", loras=[{"name": "../sd/unet/model"}])
    assert inked.event.applied["loras"] == {"ink": 0.8}
    assert inked.event.images[0].sha256 != plain.event.images[0].sha256
    assert plain_again.event.images[0].sha256 == plain.event.images[0].sha256  # the LoRA was switched off
    assert missing.code == "invalid_request"
    assert f"LoRA 'nope' not found: no {tiny.loras / 'nope.safetensors'}" in missing.message
    assert escape.code == "invalid_request" and "not a plain file name" in escape.message


async def test_a_depth_map_needs_a_configured_controlnet(diffusers_service, tiny):
    depth = ImageSource(frame=0)
    async with diffusers_service(model=str(tiny.sd)) as session:
        with pytest.raises(RenderFailed) as refused:
            await session.client.render(
                RenderRequest(request_id="depth", prompt="x", depth_map=depth, **FAST),
                images=[solid_bytes((128, 128, 128), (64, 64))],
                timeout=DEADLINE,
            )
    assert refused.value.event.code == "unsupported"
    assert "does not take a depth map" in refused.value.event.message


async def test_a_depth_map_conditions_the_render_with_the_controlnet(diffusers_service, tiny):
    async with diffusers_service(model=str(tiny.sd), controlnet=str(tiny.controlnet)) as session:
        near, far = [
            await session.client.render(
                RenderRequest(request_id=f"depth-{shade}", prompt="x", seed=2, depth_map=ImageSource(frame=0), **FAST),
                images=[solid_bytes((shade, shade, shade), (64, 64))],
                timeout=DEADLINE,
            )
            for shade in (30, 220)
        ]
        # With a reference too: ControlNet image-to-image, the depth map as its control image.
        both = await session.client.render(
            RenderRequest(
                request_id="depth-i2i",
                prompt="x",
                seed=2,
                steps=4,
                strength=0.5,
                reference_image=ImageSource(frame=0),
                depth_map=ImageSource(frame=1),
            ),
            images=[solid_bytes((200, 0, 0), (64, 64)), solid_bytes((30, 30, 30), (64, 64))],
            timeout=DEADLINE,
        )
        runner = session.runner()
        assert runner._variants["depth_t2i"].controlnet is runner.loaded.controlnet
        assert runner._variants["depth_i2i"].controlnet is runner.loaded.controlnet
        assert runner._variants["depth_i2i"].unet is runner.loaded.pipe.unet
    assert near.event.images[0].sha256 != far.event.images[0].sha256
    assert both.event.applied["strength"] == 0.5 and both.event.images[0].width == 64


async def test_sizes_the_vae_cannot_take_are_refused(diffusers_service, tiny):
    async with diffusers_service(model=str(tiny.sd)) as session:
        error = await session.fail(request_id="odd", width=100)
    assert error.code == "invalid_request" and "width 100 is not a multiple of 8" in error.message


async def test_requests_queue_for_the_one_pipeline(diffusers_service, tiny):
    """Eight at once with concurrency raised to 8: the lock serializes them; every image is right."""
    async with diffusers_service(model=str(tiny.sd), concurrency=8) as session:
        results = await asyncio.gather(
            *(session.render(request_id=f"q{n}", seed=n % 2, output_format="jpeg") for n in range(8))
        )
    digests = [result.event.images[0].sha256 for result in results]
    assert len(set(digests[0::2])) == 1 and len(set(digests[1::2])) == 1 and digests[0] != digests[1]


async def test_a_few_step_setup_scheduler_and_defaults_from_the_config(diffusers_service, tiny):
    """As for a turbo/lightning checkpoint: its scheduler with trailing timesteps, few steps, no guidance."""
    table = {
        "scheduler": "euler_a",
        "timestep_spacing": "trailing",
        "default_steps": 3,
        "default_guidance_scale": 0.0,
        "attention_slicing": True,
    }
    async with diffusers_service(model=str(tiny.sdxl), **table) as session:
        result = await session.render(request_id="turbo", steps=None)
        scheduler = session.runner().loaded.pipe.scheduler
        assert type(scheduler).__name__ == "EulerAncestralDiscreteScheduler"
        assert scheduler.config.timestep_spacing == "trailing"
    assert result.event.applied["steps"] == 3 and result.event.applied["guidance_scale"] == 0.0
    assert {total for _, total in steps_seen(session.progress["turbo"])} == {3}
