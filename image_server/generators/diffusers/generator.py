"""DiffusersGenerator: one pipeline per configured generator, in this process, on one thread.

The pipeline is loaded once (on the first request, or at start-up with ``preload``) by a
single worker thread that then runs every render, so two renders never touch it at once;
requests wait for it on an asyncio lock in arrival order. The step callback reports progress
to the event loop and stops the render when the request was cancelled or timed out.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from image_server.errors import GenerationFailed, ImageServerError
from image_server.generators.base import (
    Capabilities,
    GeneratedImage,
    GenerationResult,
    Generator,
    GeneratorConfig,
    HealthReport,
    RenderJob,
)
from image_server.generators.diffusers.config import DiffusersConfig
from image_server.generators.diffusers.model_folder import ModelFolder, inspect_model
from image_server.generators.diffusers.plan import BadLora, OutOfMemory, RenderPlan, Stopped, first_line, make_plan

if TYPE_CHECKING:
    from PIL import Image

    from image_server.generators.diffusers.running import Runner

T = TypeVar("T")
logger = logging.getLogger(__name__)


class DiffusersGenerator(Generator):
    strategy: ClassVar[str] = "diffusers"
    config_model: ClassVar[type[GeneratorConfig]] = DiffusersConfig

    config: DiffusersConfig

    def __init__(
        self, config: GeneratorConfig, *, name: str | None = None, environ: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(config, name=name, environ=environ)
        self._folder: ModelFolder | None = None
        self._runner: Runner | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = asyncio.Lock()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            text_to_image=True,
            in_process=True,
            image_to_image=True,
            max_reference_images=1,
            depth_map=self.config.controlnet is not None,
            loras=self.config.lora_dir is not None,
            min_size=64,
            max_size=4096,
            max_images=8,
            parameters=frozenset({"seed", "negative_prompt", "steps", "guidance_scale", "strength"}),
        )

    # -- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        """Find the model and its family (a missing or foreign folder fails here, naming the
        path); load it now if ``preload`` is set."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"diffusers-{self.name}")
        if self._folder is None:
            self._folder = await asyncio.to_thread(inspect_model, self.config, self.name)
        if self.config.preload:
            async with self._lock:
                await self._ensure_loaded()

    async def health(self) -> HealthReport:
        if self._folder is None:
            return HealthReport(ok=False, detail="not opened")
        state = f"loaded on {self._runner.loaded.device}" if self._runner else "loads on first use"
        return HealthReport(ok=True, detail=f"{self._folder.family} pipeline in {self._folder.path} ({state})")

    async def aclose(self) -> None:
        async with self._lock:  # a render in progress finishes (or stops) first
            runner, self._runner = self._runner, None
            executor, self._executor = self._executor, None
            if executor is not None:
                if runner is not None:
                    await asyncio.get_running_loop().run_in_executor(executor, runner.close)
                executor.shutdown(wait=False)

    async def _ensure_loaded(self) -> Runner:
        """Load the pipeline on the worker thread (call with the lock held)."""
        if self._runner is None:
            await self._opened()
            return await self._on_worker(self._load)
        return self._runner

    async def _opened(self) -> ModelFolder:
        if self._executor is None or self._folder is None:
            await self.open()
        assert self._folder is not None
        return self._folder

    def _load(self) -> Runner:
        """On the worker thread. Keeps the result itself: a load that outlives a cancelled
        request is still used by the next one."""
        from image_server.generators.diffusers.loading import load
        from image_server.generators.diffusers.running import Runner

        assert self._folder is not None
        loaded = load(self.config, self._folder, self.name)
        self._runner = Runner(loaded, controlnet_scale=self.config.controlnet_scale)
        return self._runner

    # -- rendering --------------------------------------------------------------------

    async def generate(self, job: RenderJob) -> GenerationResult:
        folder = await self._opened()
        async with self._lock:
            runner = await self._ensure_loaded()
            plan, images = await self._render(runner, job, folder.family)
        return GenerationResult(
            images=[
                GeneratedImage(image=image, width=image.width, height=image.height, seed=plan.seed + index)
                for index, image in enumerate(images)
            ],
            prompt=job.request.prompt,
            applied=plan.applied(),
            ignored=plan.ignored,
        )

    async def _render(self, runner: Runner, job: RenderJob, family: str) -> tuple[RenderPlan, list[Image.Image]]:
        """Plan (decode the references, find the LoRAs) and render, both on the worker thread:
        one hop between threads per request, not two."""
        loop = asyncio.get_running_loop()
        request_id = job.request.request_id

        def on_step(done: int, total: int) -> None:  # on the worker thread
            loop.call_soon_threadsafe(job.progress, min(1.0, done / total), f"step {done}/{total}")

        def plan_and_render() -> tuple[RenderPlan, list[Image.Image]]:
            plan = make_plan(job, self.config, family, self.name)
            started = time.perf_counter()
            images = runner.render(plan, stop, on_step)
            # benchmarks/bench_diffusers.py reads this line to tell the pipeline's time from the service's.
            logger.debug("%s pipeline %.3f ms", request_id, (time.perf_counter() - started) * 1000)
            return plan, images

        stop = threading.Event()
        try:
            return await self._on_worker(plan_and_render, stop=stop)
        except OutOfMemory as exc:
            raise GenerationFailed(
                f"generator {self.name!r} ran out of device memory ({exc}); try a smaller size or fewer images",
                request_id=request_id,
                generator=self.name,
                retryable=True,
            ) from exc
        except BadLora as exc:
            raise GenerationFailed(
                f"generator {self.name!r}: LoRA does not load: {exc}", request_id=request_id, generator=self.name
            ) from exc

    async def _on_worker(self, function: Callable[..., T], *args: Any, stop: threading.Event | None = None) -> T:
        """Run ``function`` on the worker thread. If this task is cancelled (a CancelRequest or a
        timeout), set ``stop`` and wait for the thread to let go of the pipeline before the
        cancellation goes on, so the next render never finds it busy."""
        assert self._executor is not None
        future = asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if stop is not None:
                stop.set()
            await asyncio.wait([future])
            if not future.cancelled():
                future.exception()  # Stopped, or whatever ended it: the cancellation is the outcome
            raise
        except (ImageServerError, OutOfMemory, BadLora, Stopped):
            raise
        except Exception as exc:
            raise GenerationFailed(f"generator {self.name!r} failed: {first_line(exc)}", generator=self.name) from exc
