"""Price tables: what one render on a generator costs, and the defaults for built-in providers.

A price is a sum of three parts, each optional: per image, per megapixel (of every image)
and per step (of every image). Estimates use the request's own size and steps, or the
generator's defaults where it leaves them out; the actual cost uses what the provider
reported it applied (``ImageReady.applied``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from schemas import RenderRequest

DEFAULT_SIDE = 1024
DEFAULT_STEPS = 4


class Price(BaseModel):
    """``[spend.prices.<generator>]``: every part is in ``currency`` units."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_image: float = Field(default=0.0, ge=0)
    per_megapixel: float = Field(default=0.0, ge=0)
    per_step: float = Field(default=0.0, ge=0)
    # Providers that bill whole megapixels (fal) round each image up.
    round_megapixels_up: bool = False
    default_steps: int = Field(default=DEFAULT_STEPS, ge=1)

    def cost(self, *, images: int, width: int, height: int, steps: int | None) -> float:
        megapixels = width * height / 1_000_000
        if self.round_megapixels_up:
            megapixels = float(math.ceil(megapixels))
        each = self.per_image + self.per_megapixel * megapixels + self.per_step * (steps or self.default_steps)
        return round(images * each, 6)


# Defaults for built-in strategies, from the providers' public price pages; read 2026-11-30 from
# copies of those pages (this machine has no internet: check them before trusting a budget).
# A provider whose price depends on a model this table cannot see (Leonardo's credits,
# Runware's per-model rates) has no default: set [spend.prices.<generator>] for it.
BUILT_IN_PRICES: dict[str, Price] = {
    # https://fal.ai/models/fal-ai/flux/schnell: $0.003 per megapixel, rounded up (fal's default model).
    "fal": Price(per_megapixel=0.003, round_megapixels_up=True),
    # https://openai.com/api/pricing: dall-e-3 standard 1024x1024 $0.040 per image.
    "openai": Price(per_image=0.04),
    # https://ai.google.dev/gemini-api/docs/pricing: gemini-2.5-flash-image, 1290 output
    # tokens at $30 per million = $0.039 per image.
    "gemini": Price(per_image=0.039),
    # https://developers.cloudflare.com/workers-ai/platform/pricing: flux-1-schnell $0.0000528
    # per 512x512 tile ($0.000201 per megapixel) and $0.0001056 per step.
    "cloudflare": Price(per_megapixel=0.000201, per_step=0.0001056),
    # https://kie.ai/seedream-api: Seedream 4.0, 3.5 credits ($0.0175) per image.
    "kie": Price(per_image=0.0175),
    "mock": Price(),
}


def price_for(name: str, strategy: str, configured: Mapping[str, Price]) -> Price | None:
    """The configured price for generator ``name``, else its strategy's default, else None."""
    return configured.get(name) or BUILT_IN_PRICES.get(strategy)


def estimate(price: Price, request: RenderRequest) -> float:
    """What ``request`` should cost before it runs."""
    return price.cost(
        images=request.num_images,
        width=request.width or DEFAULT_SIDE,
        height=request.height or DEFAULT_SIDE,
        steps=request.steps,
    )


def actual(price: Price, request: RenderRequest, applied: Mapping[str, Any], images: int) -> float:
    """What a finished render cost, from what the provider says it applied."""

    def number(key: str, fallback: int | None) -> int | None:
        value = applied.get(key)
        return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else fallback

    return price.cost(
        images=images,
        width=number("width", request.width or DEFAULT_SIDE) or DEFAULT_SIDE,
        height=number("height", request.height or DEFAULT_SIDE) or DEFAULT_SIDE,
        steps=number("steps", request.steps),
    )
