"""MockGenerator: deterministic local images with scriptable delays and failures.

It needs no network or model, so it is the default generator of a fresh install and the
generator every service test uses. A ``handler`` (sync or async, like httpx.MockTransport's)
can script results, failures or checks on the job before the normal drawing happens.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image, ImageOps, UnidentifiedImageError

from image_server.encoding import LOSSY_FORMATS, encode_lossy
from image_server.errors import ConfigError, GenerationFailed
from image_server.formats import image_format_of
from image_server.generators.base import (
    Capabilities,
    GeneratedImage,
    GenerationResult,
    Generator,
    GeneratorConfig,
    HealthReport,
    RenderJob,
)
from image_server.generators.mock.config import MockConfig
from image_server.generators.mock.drawing import STYLES, Style, blend_reference, derive_seed
from image_server.generators.mock.pool import DrawingFailed, DrawingPool, PoolUnavailable, WorkerLost
from image_server.generators.mock.render import Sketch, picture
from image_server.offload import WORKER_NICENESS

logger = logging.getLogger(__name__)
MockHandler = Callable[[RenderJob], "GenerationResult | None | Awaitable[GenerationResult | None]"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
DEFAULT_STRENGTH = 0.5
_STYLE_NAMES: dict[str, Style] = {style: style for style in STYLES}


class MockGenerator(Generator):
    """Draws images from the request's prompt and seed; see ``mock_drawing`` for the styles."""

    strategy: ClassVar[str] = "mock"
    config_model: ClassVar[type[GeneratorConfig]] = MockConfig

    config: MockConfig

    def __init__(
        self,
        config: GeneratorConfig,
        *,
        name: str | None = None,
        environ: Mapping[str, str] | None = None,
        handler: MockHandler | None = None,
    ) -> None:
        super().__init__(config, name=name, environ=environ)
        self._handler = handler
        self._folder_images: list[Path] | None = None
        self._processes = self.config.drawing_processes()
        self._pool: DrawingPool | None = None
        self._closed = False

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            text_to_image=True,
            in_process=True,
            image_to_image=True,
            max_reference_images=10,
            max_images=8,
            min_size=64,
            max_size=4096,
            max_prompt_chars=self.config.max_prompt_chars,
            parameters=frozenset({"seed", "strength", "style", "steps", "guidance_scale", "negative_prompt"}),
        )

    async def open(self) -> None:
        """List ``image_dir`` (if set); a missing or empty folder is a ``ConfigError``."""
        if self.config.image_dir is not None and self._folder_images is None:
            self._folder_images = await asyncio.to_thread(_list_images, self.config.image_dir, self.name)

    async def health(self) -> HealthReport:
        return HealthReport(ok=True, detail="mock generator: always available")

    async def aclose(self) -> None:
        """End the drawing processes (idempotent)."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.aclose()

    @property
    def drawing_pids(self) -> list[int]:
        """The process ids of the drawing processes running now (none until one is needed)."""
        return self._pool.pids if self._pool is not None else []

    async def generate(self, job: RenderJob) -> GenerationResult:
        """Run the handler (if any); unless it returned a result, wait, maybe fail, then draw."""
        if self._handler is not None:
            scripted = self._handler(job)
            if inspect.isawaitable(scripted):
                scripted = await scripted
            if scripted is not None:
                return scripted
        # The manager hands each request an instance whose config already has the request's
        # generator_config applied (and refused what MockConfig.OVERRIDABLE does not allow).
        config = self.config
        request = job.request
        delay = config.delay_s
        if (
            config.tail_rate
            and random.Random(f"{request.request_id}:{self.name}:{job.attempt}").random() < config.tail_rate
        ):
            delay += config.tail_delay_s
        if delay > 0:
            await asyncio.sleep(delay)
        if random.Random(f"{request.request_id}:{job.attempt}").random() < config.fail_rate:
            raise GenerationFailed(
                f"{self.name}: simulated failure (fail_rate={config.fail_rate}, attempt {job.attempt})",
                request_id=request.request_id,
                generator=self.name,
                retryable=True,
            )
        if config.image_dir is not None:
            await self.open()
        seed = request.seed if request.seed is not None else derive_seed(request.request_id)
        style = _STYLE_NAMES.get((request.style or "").lower(), config.style)
        strength = request.strength if request.strength is not None else DEFAULT_STRENGTH
        job.progress(None, "drawing")
        # JPEG and WebP are encoded here, in the same hop as the drawing (or in a drawing
        # process); the store keeps such bytes as they are. PNG stays pixels: the store
        # applies the service's compress level.
        encode_as = request.output_format if request.output_format in LOSSY_FORMATS else None
        images: list[GeneratedImage] | None = None
        if encode_as is not None and self._in_processes(job):
            images = await self._render_in_processes(job, seed, style, encode_as)
        if images is None:
            images = await asyncio.to_thread(self._render_all, job, seed, style, strength, encode_as)
        applied: dict[str, Any] = {"width": images[0].width, "height": images[0].height, "seed": seed, "style": style}
        if job.references:
            applied["strength"] = strength
        return GenerationResult(images=images, prompt=request.prompt, applied=applied)

    def _in_processes(self, job: RenderJob) -> bool:
        """Drawn pictures big enough to be worth a process (folder images and blends stay here)."""
        return (
            self._processes > 0
            and not self._closed
            and self._folder_images is None
            and not job.references
            and job.width * job.height >= self.config.process_min_pixels
        )

    async def _render_in_processes(
        self, job: RenderJob, seed: int, style: Style, encode_as: str
    ) -> list[GeneratedImage] | None:
        """Every image drawn and encoded in the drawing processes, side by side; None if no
        process can be started (the caller draws in a thread)."""
        if self._pool is None:
            self._pool = DrawingPool(self._processes, niceness=WORKER_NICENESS)
        sketches = [self._sketch(job, seed + index, style, index, encode_as) for index in range(job.request.num_images)]
        try:
            encoded = await asyncio.gather(*(self._pool.render(sketch) for sketch in sketches))
        except PoolUnavailable as exc:
            if not self._closed:
                logger.warning("generator %s: %s; drawing in threads from now on", self.name, exc)
                self._processes = 0
            return None
        except (WorkerLost, DrawingFailed) as exc:
            raise GenerationFailed(
                f"{self.name}: {exc}",
                request_id=job.request.request_id,
                generator=self.name,
                retryable=isinstance(exc, WorkerLost),  # a lost process is replaced for the next try
            ) from exc
        return [
            GeneratedImage(data=data, format=encode_as, width=sketch.width, height=sketch.height, seed=sketch.seed)
            for sketch, data in zip(sketches, encoded, strict=True)
        ]

    def _sketch(self, job: RenderJob, seed: int, style: Style, index: int, encode_as: str | None) -> Sketch:
        lines = tuple(self._debug_lines(job, seed, style, index)) if style == "debug" else ()
        return Sketch(style, job.width, job.height, seed, job.request.prompt, lines, encode_as)

    def _render_all(
        self, job: RenderJob, seed: int, style: Style, strength: float, encode_as: str | None
    ) -> list[GeneratedImage]:
        """Blocking: draw (or load) every image of the request, encoded as ``encode_as`` if set."""
        reference = job.references[0].to_pil(at_least=(job.width, job.height)) if job.references else None
        images: list[GeneratedImage] = []
        for index in range(job.request.num_images):
            image_seed = seed + index
            if self._folder_images is not None:
                served = self._from_folder(self._folder_images, job, image_seed, reference is None)
                if isinstance(served, GeneratedImage):
                    images.append(served)
                    continue
                drawn = served
            else:
                drawn = picture(self._sketch(job, image_seed, style, index, encode_as))
            if reference is not None:
                drawn = blend_reference(drawn, reference, strength)
            images.append(_finished(drawn, image_seed, encode_as))
        return images

    def _from_folder(
        self, files: list[Path], job: RenderJob, seed: int, untouched: bool
    ) -> GeneratedImage | Image.Image:
        """The folder image chosen by ``seed``: its own bytes if no size was asked for and it
        need not be blended, else decoded and cropped to the requested size."""
        path = files[seed % len(files)]
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as opened:
                if untouched and job.request.width is None and job.request.height is None:
                    fmt = image_format_of(data)
                    return GeneratedImage(data=data, format=fmt, width=opened.width, height=opened.height, seed=seed)
                return ImageOps.fit(opened.convert("RGB"), (job.width, job.height), Image.Resampling.BICUBIC)
        except (OSError, UnidentifiedImageError) as exc:
            raise GenerationFailed(
                f"{self.name}: cannot read {path.name} from image_dir: {exc}",
                request_id=job.request.request_id,
                generator=self.name,
            ) from exc

    def _debug_lines(self, job: RenderJob, seed: int, style: Style, index: int) -> list[str]:
        request = job.request
        lines = [
            f"request_id: {request.request_id}",
            f"generator: {self.name}",
            f"size: {job.width}x{job.height}",
            f"seed: {seed}",
            f"image: {index + 1}/{request.num_images}",
            f"steps: {request.steps}",
            f"guidance_scale: {request.guidance_scale}",
            f"style: {style}",
        ]
        if job.references:
            lines.append(f"references: {len(job.references)} (strength {request.strength})")
        if request.negative_prompt:
            lines.append(f"negative_prompt: {request.negative_prompt}")
        lines.append(f"prompt: {request.prompt}")
        return lines


def _finished(drawn: Image.Image, seed: int, encode_as: str | None) -> GeneratedImage:
    """The picture as the store should get it: encoded when ``encode_as`` is set."""
    if encode_as is None:
        return GeneratedImage(image=drawn, width=drawn.width, height=drawn.height, seed=seed)
    return GeneratedImage(
        data=encode_lossy(drawn, encode_as), format=encode_as, width=drawn.width, height=drawn.height, seed=seed
    )


def _list_images(folder: Path, name: str) -> list[Path]:
    """Blocking: the image files in ``folder``, sorted so choices by seed are stable."""
    if not folder.is_dir():
        raise ConfigError(f"generator {name!r}: image_dir {folder} is not a folder", generator=name)
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ConfigError(f"generator {name!r}: image_dir {folder} holds no images ({suffixes})", generator=name)
    return found
