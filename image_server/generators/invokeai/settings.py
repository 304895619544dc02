"""Settle one request's render settings into a ``GraphSpec``, and say what was applied or ignored.

Each setting comes from the request, else the generator's config, else the model's own
``default_settings`` in InvokeAI, else the family's usual value. Sizes are rounded to what
the family's latents allow; the rounded values are the ones reported as applied.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any

from image_server.generators.base import RenderJob
from image_server.generators.invokeai.config import InvokeAIConfig
from image_server.generators.invokeai.graph import FAMILY_OF_BASE, SEED_MAX, Family, GraphSpec, ModelRef, round_size
from image_server.generators.invokeai.models import ModelCatalog

NATIVE_SIDE: dict[Family, int] = {"sd1": 512, "sdxl": 1024, "flux": 1024}
DEFAULT_CFG = 7.5
DEFAULT_FLUX_GUIDANCE = 4.0
DEFAULT_STRENGTH = 0.75


@dataclass
class Settled:
    spec: GraphSpec
    applied: dict[str, Any]
    ignored: list[str] = field(default_factory=list)


def first(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def default_steps(family: Family, model: ModelRef) -> int:
    if family == "flux":
        return 4 if model.variant == "schnell" else 28
    return 30


def render_size(config: InvokeAIConfig, job: RenderJob, model: ModelRef, family: Family) -> tuple[int, int]:
    """Request, config, model defaults; with none, a reference's aspect ratio at the family's native area."""
    request, defaults = job.request, model.defaults
    native = NATIVE_SIDE[family]
    width = first(request.width, config.width, defaults.get("width"))
    height = first(request.height, config.height, defaults.get("height"))
    if (width is None or height is None) and job.references and not (request.width or request.height):
        ref = job.references[0]
        scale = math.sqrt(native * native / (ref.width * ref.height))
        width, height = width or ref.width * scale, height or ref.height * scale
    width, height = int(width or native), int(height or native)
    return round_size(width, family), round_size(height, family)


async def settle(
    config: InvokeAIConfig,
    job: RenderJob,
    model: ModelRef,
    catalog: ModelCatalog,
) -> Settled:
    """Everything but the board and the uploaded image's name, which the caller fills in after."""
    request, defaults = job.request, model.defaults
    family = FAMILY_OF_BASE[model.base]
    ignored: list[str] = []
    width, height = render_size(config, job, model, family)
    steps = int(first(request.steps, config.steps, defaults.get("steps"), default_steps(family, model)))
    seed = request.seed % (SEED_MAX + 1) if request.seed is not None else secrets.randbelow(SEED_MAX + 1)
    scheduler = first(config.scheduler, defaults.get("scheduler"))
    applied: dict[str, Any] = {"model": model.name, "base": model.base, "width": width, "height": height}
    applied |= {"steps": steps, "seed": seed}
    cfg_scale = guidance = None
    if family == "flux":
        guidance = float(
            first(request.guidance_scale, config.guidance, defaults.get("guidance"), DEFAULT_FLUX_GUIDANCE)
        )
        applied["guidance"] = guidance
        if request.negative_prompt is not None:
            ignored.append("negative_prompt")  # FLUX.1 graphs take no negative prompt
    else:
        cfg_scale = float(first(request.guidance_scale, config.cfg_scale, defaults.get("cfg_scale"), DEFAULT_CFG))
        applied["cfg_scale"] = cfg_scale
        if request.negative_prompt:
            applied["negative_prompt"] = True
    if scheduler is not None:
        applied["scheduler"] = scheduler
    strength = DEFAULT_STRENGTH
    if job.references:
        strength = first(request.strength, DEFAULT_STRENGTH)
        applied |= {"strength": strength, "reference_images": 1}
    elif request.strength is not None:
        ignored.append("strength")  # strength only means something with a reference image
    loras = []
    for lora in request.loras:
        loras.append((await catalog.lora(lora.name, model.base), lora.strength))
    if loras:
        applied["loras"] = [{"name": ref.name, "strength": weight} for ref, weight in loras]
    components = None
    if family == "flux":
        components = (
            await catalog.component("t5_encoder", config.t5_encoder, None, "T5 encoder"),
            await catalog.component("clip_embed", config.clip_embed, None, "CLIP embed model"),
            await catalog.component("vae", config.vae, "flux", "FLUX VAE"),
        )
        applied["components"] = [ref.name for ref in components]
    spec = GraphSpec(
        family=family,
        model=model,
        prompt=request.prompt,
        negative_prompt=(request.negative_prompt or "") if family != "flux" else "",
        width=width,
        height=height,
        steps=steps,
        seed=seed,
        cfg_scale=cfg_scale,
        guidance=guidance,
        scheduler=scheduler,
        loras=tuple(loras),
        strength=strength,
        flux_components=components,
    )
    return Settled(spec, applied, ignored)
