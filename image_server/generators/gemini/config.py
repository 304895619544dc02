"""Gemini strategy configuration and the aspect ratios it knows."""

from __future__ import annotations

import math
from typing import ClassVar, Literal, get_args

from pydantic import Field

from image_server.generators.base import GeneratorConfig

AspectRatio = Literal["1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"]
ASPECT_RATIOS: tuple[str, ...] = get_args(AspectRatio)


class GeminiConfig(GeneratorConfig):
    """``[generators.<name>]`` with ``strategy = "gemini"``."""

    # Model knobs only; the manager builds an instance with them applied. The model itself is
    # not overridable: pick another model (and its cost) by configuring another generator name.
    OVERRIDABLE: ClassVar[frozenset[str]] = frozenset({"aspect_ratio", "image_size"})

    strategy: Literal["gemini"] = "gemini"
    model: str = Field(default="gemini-2.5-flash-image", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    api_key_env: str = "GEMINI_API_KEY"
    base_url: str = Field(default="https://generativelanguage.googleapis.com", pattern=r"^https?://")
    api_version: str = Field(default="v1beta", pattern=r"^v[0-9a-z]+$")
    # None: derived from the request's width/height (nearest ratio), or the model's default.
    aspect_ratio: AspectRatio | None = None
    # 1K/2K/4K exist for the 3.x image models only; 2.5-flash-image is 1K.
    image_size: Literal["1K", "2K", "4K"] | None = None
    # Ask for responseModalities ["IMAGE"] instead of ["TEXT", "IMAGE"] (no text parts back).
    image_only: bool = False
    # Google: best results with <= 3 inputs on 2.5-flash-image, up to 14 on 3-pro-image.
    max_reference_images: int = Field(default=3, ge=0, le=14)
    request_timeout_s: float | None = Field(default=None, gt=0, le=3600)


def nearest_aspect_ratio(width: int, height: int) -> str:
    """The supported aspect ratio closest to ``width:height`` (compared on a log scale)."""
    target = math.log(width / height)

    def distance(ratio: str) -> float:
        w, _, h = ratio.partition(":")
        return abs(math.log(int(w) / int(h)) - target)

    return min(ASPECT_RATIOS, key=distance)
