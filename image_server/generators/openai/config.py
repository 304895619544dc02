"""OpenAI Images models and their limits, size mapping, and the ``openai`` strategy's config.

Per providers/API_CONTRACTS.md section 2.1/2.2; the generator itself is in ``generator.py``.
The model is a free string: ``MODELS`` knows the limits of the models OpenAI lists, and any
other name is sent with the generic gpt-image parameters (``GENERIC``), so a model released
after this table still works.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from datetime import date
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from image_server.generators.base import GeneratorConfig

DEFAULT_MODEL = "gpt-image-2"
GPT_IMAGE_SIZES = ("1024x1024", "1536x1024", "1024x1536")
DALLE3_SIZES = ("1024x1024", "1792x1024", "1024x1792")
DALLE2_SIZES = ("256x256", "512x512", "1024x1024")
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
    input_fidelity: frozenset[str] = frozenset()  # values the edits endpoint takes; empty: none
    styles: tuple[str, ...] = ()  # dall-e-3's vivid/natural
    shutdown: date | None = None  # OpenAI's shutdown date (past: retired; future: scheduled)

    def retired(self, today: date) -> bool:
        return self.shutdown is not None and self.shutdown <= today


_FIDELITY = frozenset({"high", "low"})
_GPT = ModelSpec(True, GPT_IMAGE_SIZES, GPT_IMAGE_QUALITIES, 10, 16, 32_000, _FIDELITY)
# Any other model name: the parameters every gpt-image model takes, input_fidelity as configured.
GENERIC = _GPT
# Shutdown dates as the official SDK notes them (issue 9): gpt-image-1 on 2026-10-23, dall-e-2/3 on
# 2026-05-12; gpt-image-1-mini and gpt-image-1.5 are listed for 2026-12-01.
MODELS: dict[str, ModelSpec] = {
    "gpt-image-2": ModelSpec(True, None, GPT_IMAGE_QUALITIES, 10, 16, 32_000),  # no input_fidelity
    "gpt-image-1.5": replace(_GPT, shutdown=date(2026, 12, 1)),
    "gpt-image-1-mini": replace(_GPT, input_fidelity=frozenset({"low"}), shutdown=date(2026, 12, 1)),
    "gpt-image-1": replace(_GPT, shutdown=date(2026, 10, 23)),
    "dall-e-3": ModelSpec(
        False, DALLE3_SIZES, DALLE3_QUALITIES, 1, 0, 4_000, styles=DALLE3_STYLES, shutdown=date(2026, 5, 12)
    ),
    "dall-e-2": ModelSpec(False, DALLE2_SIZES, frozenset({"standard"}), 10, 1, 1_000, shutdown=date(2026, 5, 12)),
}


def model_spec(model: str) -> ModelSpec:
    """The known limits of ``model``, or the generic gpt-image ones."""
    return MODELS.get(model, GENERIC)


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
    spec = model_spec(model)
    if spec.sizes is None:
        return _free_size(width, height)
    ratio, area = math.log(width / height), math.log(width * height)

    def distance(size: str) -> tuple[float, float]:
        w, h = size_dims(size)
        return abs(ratio - math.log(w / h)), abs(area - math.log(w * h))

    return min(spec.sizes, key=distance)


def _size_allowed(model: str, size: str) -> bool:
    spec = model_spec(model)
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
    # Any model name; MODELS knows the limits of OpenAI's listed ones (see the module docstring).
    model: str = Field(default=DEFAULT_MODEL, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
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

    @property
    def spec(self) -> ModelSpec:
        return model_spec(self.model)

    def startup_warnings(self, today: date | None = None) -> list[str]:
        spec, today = self.spec, today or date.today()
        if spec.retired(today):
            return [f"OpenAI shut {self.model} down on {spec.shutdown}: requests will fail; use {DEFAULT_MODEL}"]
        if spec.shutdown is not None:
            return [f"OpenAI shuts {self.model} down on {spec.shutdown}; move to {DEFAULT_MODEL}"]
        return []

    @model_validator(mode="after")
    def _fits_model(self) -> OpenAIConfig:
        spec = self.spec
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
        if self.style is not None and self.style not in spec.styles:
            misplaced.append("style")
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)} cannot be used with {self.model}")
        if self.input_fidelity is not None and spec.gpt_image and self.input_fidelity not in spec.input_fidelity:
            takes = f"only {', '.join(sorted(spec.input_fidelity))}" if spec.input_fidelity else "no input_fidelity"
            raise ValueError(f"input_fidelity {self.input_fidelity!r} is not valid for {self.model} (it takes {takes})")
        if self.background == "transparent" and self.output_format == "jpeg":
            raise ValueError("background 'transparent' needs output_format png or webp")
        return self
