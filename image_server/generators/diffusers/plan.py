"""What one render asks the pipeline for: the request turned into pipeline arguments (no torch).

Built on a worker thread (it decodes the reference and depth images and looks up LoRA files).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from image_server.errors import InvalidRequest
from image_server.generators.base import RenderJob
from image_server.generators.diffusers.config import DiffusersConfig
from image_server.generators.diffusers.model_folder import DEFAULTS, lora_file

DEFAULT_STRENGTH = 0.6


@dataclass
class RenderPlan:
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    init_image: Image.Image | None = None
    strength: float | None = None
    control_image: Image.Image | None = None
    loras: list[tuple[str, Path, float]] = field(default_factory=list)  # adapter name, file, weight
    ignored: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """Which pipeline variant renders it: text-to-image or image-to-image, with or without depth."""
        return ("depth_" if self.control_image is not None else "") + ("i2i" if self.init_image is not None else "t2i")

    def applied(self) -> dict[str, Any]:
        applied: dict[str, Any] = {
            "width": self.width,
            "height": self.height,
            "seed": self.seed,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
        }
        if self.strength is not None:
            applied["strength"] = self.strength
        if self.loras:
            applied["loras"] = {name: weight for name, _, weight in self.loras}
        return applied


def seed_for(job: RenderJob) -> int:
    """The request's seed, or one derived from its id, so a repeated request repeats its image."""
    if job.request.seed is not None:
        return job.request.seed
    return int.from_bytes(hashlib.sha256(job.request.request_id.encode()).digest()[:4], "big")


def make_plan(job: RenderJob, config: DiffusersConfig, family: str, generator: str) -> RenderPlan:
    request = job.request
    defaults = DEFAULTS[family]
    size = config.default_size or defaults.size
    width, height = request.width or size, request.height or size
    if job.references and request.width is None and request.height is None:
        # Image-to-image keeps the reference's shape, cut down to what the VAE takes.
        multiple = defaults.size_multiple
        reference = job.references[0]
        width = max(multiple, reference.width // multiple * multiple)
        height = max(multiple, reference.height // multiple * multiple)
    for side, value in (("width", width), ("height", height)):
        if value % defaults.size_multiple:
            raise InvalidRequest(
                f"{side} {value} is not a multiple of {defaults.size_multiple}, which {family} pipelines need",
                request_id=request.request_id,
                generator=generator,
            )
    plan = RenderPlan(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt if defaults.negative_prompt else None,
        width=width,
        height=height,
        steps=request.steps or config.default_steps or defaults.steps,
        guidance_scale=_first_set(request.guidance_scale, config.default_guidance_scale, defaults.guidance_scale),
        seed=seed_for(job),
        num_images=request.num_images,
    )
    if request.negative_prompt and not defaults.negative_prompt:
        plan.ignored.append("negative_prompt")
    if job.references:
        plan.init_image = job.references[0].to_pil().convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
        plan.strength = request.strength if request.strength is not None else DEFAULT_STRENGTH
    elif request.strength is not None:
        plan.ignored.append("strength")
    if job.depth_map is not None:
        plan.control_image = job.depth_map.to_pil().convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    for lora in request.loras:
        path = lora_file(config.lora_dir, lora.name, request_id=request.request_id, generator=generator)
        plan.loras.append((path.stem, path, lora.strength))
    return plan


def _first_set(*values: float | None) -> float:
    return next(value for value in values if value is not None)


# What the worker thread raises besides image_server errors (defined here, where no torch is imported,
# so the generator can catch them before the pipeline was ever loaded).
class Stopped(Exception):
    """Raised from the step callback to end a render that was cancelled or timed out."""


class OutOfMemory(Exception):
    """The device ran out of memory; the pipeline itself is still usable."""


class BadLora(Exception):
    """A LoRA file that does not load onto this pipeline."""


def first_line(exc: BaseException) -> str:
    """The exception's type and first line: library errors can run to pages of context."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
