"""OpenAI Images models and their limits, size mapping, and the ``openai`` strategy's config.

Per providers/API_CONTRACTS.md section 2.1/2.2; the generator itself is in ``openai.py``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from image_server.generators.base import GeneratorConfig

OpenAIModel = Literal["gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "gpt-image-2", "dall-e-3"]
GPT_IMAGE_SIZES = ("1024x1024", "1536x1024", "1024x1536")
DALLE3_SIZES = ("1024x1024", "1792x1024", "1024x1792")
GPT_IMAGE_QUALITIES = frozenset({"low", "medium", "high", "auto"})
DALLE3_QUALITIES = frozenset({"standard", "hd"})
DALLE3_STYLES = ("vivid", "natural")
# gpt-image-2 takes any WxH: multiples of 16, ratio within 3:1, long edge <= 3840 and at most 3840x2160 pixels.
FREE_STEP, FREE_MAX_EDGE, FREE_MAX_PIXELS, FREE_MAX_RATIO = 16, 3840, 3840 * 2160, 3.0
SIZE_PATTERN = re.compile(r"^(\d{2,5})x(\d{2,5})$")


@dataclass(frozen=True)
class ModelSpec:
    """What one model accepts; ``sizes`` None means any WxH within the gpt-image-2 rules."""

    gpt_image: bool
    sizes: tuple[str, ...] | None
    qualities: frozenset[str]
    max_images: int
    max_references: int  # 0: the model has no edits endpoint
    max_prompt_chars: int


_GPT = ModelSpec(True, GPT_IMAGE_SIZES, GPT_IMAGE_QUALITIES, 10, 16, 32_000)
MODELS: dict[str, ModelSpec] = {
    "gpt-image-1": _GPT,
    "gpt-image-1-mini": _GPT,
    "gpt-image-1.5": _GPT,
    "gpt-image-2": ModelSpec(True, None, GPT_IMAGE_QUALITIES, 10, 16, 32_000),
    "dall-e-3": ModelSpec(False, DALLE3_SIZES, DALLE3_QUALITIES, 1, 0, 4_000),
}


def size_dims(size: str) -> tuple[int, int]:
    width, _, height = size.partition("x")
    return int(width), int(height)


def _free_size_ok(width: int, height: int) -> bool:
    return (
        width > 0
        and height > 0
        and width % FREE_STEP == 0
        and height % FREE_STEP == 0
        and max(width, height) <= FREE_MAX_EDGE
        and width * height <= FREE_MAX_PIXELS
        and max(width / height, height / width) <= FREE_MAX_RATIO
    )


def _free_size(width: int, height: int) -> str:
    """The nearest WxH gpt-image-2 takes: same ratio and area where the limits allow."""
    ratio = min(max(width / height, 1 / FREE_MAX_RATIO), FREE_MAX_RATIO)
    h = math.sqrt(min(width * height, FREE_MAX_PIXELS) / ratio)
    w = h * ratio
    shrink = min(1.0, FREE_MAX_EDGE / max(w, h))
    w16 = max(FREE_STEP, round(w * shrink / FREE_STEP) * FREE_STEP)
    h16 = max(FREE_STEP, round(h * shrink / FREE_STEP) * FREE_STEP)
    # Rounding to the nearest step can cross a limit by one step: step the long side back.
    while not _free_size_ok(w16, h16):
        if w16 >= h16:
            w16 -= FREE_STEP
        else:
            h16 -= FREE_STEP
    return f"{w16}x{h16}"


def nearest_size(model: str, width: int, height: int) -> str:
    """The supported size string closest to ``width`` x ``height``: aspect ratio first, then area."""
    spec = MODELS[model]
    if spec.sizes is None:
        return _free_size(width, height)
    ratio, area = math.log(width / height), math.log(width * height)

    def distance(size: str) -> tuple[float, float]:
        w, h = size_dims(size)
        return abs(ratio - math.log(w / h)), abs(area - math.log(w * h))

    return min(spec.sizes, key=distance)


def _size_allowed(model: str, size: str) -> bool:
    spec = MODELS[model]
    if size == "auto":
        return spec.gpt_image
    if spec.sizes is not None:
        return size in spec.sizes
    return SIZE_PATTERN.match(size) is not None and _free_size_ok(*size_dims(size))


class OpenAIConfig(GeneratorConfig):
    """``[generators.<name>]`` with ``strategy = "openai"``. Unset knobs are not sent (provider default)."""

    # Look-and-feel knobs only: model, keys, URLs and timeouts stay as configured.
    OVERRIDABLE: ClassVar[frozenset[str]] = frozenset(
        "quality background style size output_format output_compression moderation input_fidelity".split()
    )

    strategy: Literal["openai"] = "openai"
    model: OpenAIModel = "gpt-image-1"
    api_key_env: str = Field(default="OPENAI_API_KEY", min_length=1)
    base_url: str = "https://api.openai.com/v1"
    organization_env: str | None = None
    project_env: str | None = None
    size: str | None = None  # used when a request gives neither width nor height
    quality: Literal["low", "medium", "high", "auto", "standard", "hd"] | None = None
    background: Literal["transparent", "opaque", "auto"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None  # default: the request's output_format
    output_compression: int | None = Field(default=None, ge=0, le=100)
    moderation: Literal["low", "auto"] | None = None
    input_fidelity: Literal["high", "low"] | None = None
    style: Literal["vivid", "natural"] | None = None
    user: str | None = None
    request_timeout_s: float | None = Field(default=None, gt=0, le=3600)  # per HTTP call; None: timeout_s

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("base_url must be an http(s) URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _fits_model(self) -> OpenAIConfig:
        spec = MODELS[self.model]
        if self.size is not None and not _size_allowed(self.model, self.size):
            fixed = ", ".join(spec.sizes) if spec.sizes else "WxH (multiples of 16, within 3:1, up to 3840x2160)"
            allowed = f"auto, {fixed}" if spec.gpt_image else fixed
            raise ValueError(f"size {self.size!r} is not valid for {self.model} (use {allowed})")
        if self.quality is not None and self.quality not in spec.qualities:
            raise ValueError(
                f"quality {self.quality!r} is not valid for {self.model} ({', '.join(sorted(spec.qualities))})"
            )
        gpt_only = ("background", "output_format", "output_compression", "moderation", "input_fidelity")
        misplaced = [name for name in gpt_only if getattr(self, name) is not None and not spec.gpt_image]
        if self.style is not None and spec.gpt_image:
            misplaced.append("style")
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)} cannot be used with {self.model}")
        if self.background == "transparent" and self.output_format == "jpeg":
            raise ValueError("background 'transparent' needs output_format png or webp")
        return self
