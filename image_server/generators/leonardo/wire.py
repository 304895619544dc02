"""Leonardo v1 request bodies and response parsing (API_CONTRACTS.md section 6).

Everything here is pure: the generator does the I/O. Parsers raise ``GenerationFailed``
for shapes the contract does not allow.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from image_server.errors import ContentPolicy, GenerationFailed, InvalidRequest, Unsupported
from image_server.generators.base import RenderJob
from image_server.generators.leonardo.config import (
    GUIDANCE_RANGE,
    INIT_STRENGTH_RANGE,
    LARGE_SIDE,
    MAX_IMAGES_LARGE,
    PRESET_STYLES,
    SIDE_MULTIPLE,
    STEPS_RANGE,
    UUID_PATTERN,
    LeonardoConfig,
)

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}  # our format -> /init-image extension
UUID = re.compile(UUID_PATTERN)


@dataclass
class Built:
    body: dict[str, Any]
    applied: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def snap(value: int, multiple: int = SIDE_MULTIPLE) -> int:
    """The nearest multiple of ``multiple`` (never 0)."""
    return max(multiple, round(value / multiple) * multiple)


def clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def build_body(
    job: RenderJob, config: LeonardoConfig, *, ignored: list[str], init_image_id: str | None, generator: str
) -> Built:
    """The ``POST /generations`` body; ``applied`` holds what was sent where it differs from the request."""
    request = job.request
    body: dict[str, Any] = {"prompt": request.prompt, "num_images": request.num_images, "public": config.public}
    built = Built(body, {"num_images": request.num_images}, list(ignored))
    if config.model_id is not None:
        body["modelId"] = built.applied["model_id"] = config.model_id
    width = snap(request.width) if request.width is not None else config.width
    height = snap(request.height) if request.height is not None else config.height
    for side, value in (("width", width), ("height", height)):
        if value is not None:
            body[side] = built.applied[side] = value
    if request.num_images > MAX_IMAGES_LARGE and max(width or 0, height or 0) > LARGE_SIDE:
        raise Unsupported(
            f"{generator}: Leonardo makes at most {MAX_IMAGES_LARGE} images when a side is over {LARGE_SIDE} px",
            generator=generator,
        )
    if request.negative_prompt is not None:
        body["negative_prompt"] = request.negative_prompt
    steps = request.steps if request.steps is not None else config.num_inference_steps
    if steps is not None:
        body["num_inference_steps"] = built.applied["steps"] = int(clamp(steps, *STEPS_RANGE))
    guidance = request.guidance_scale if request.guidance_scale is not None else config.guidance_scale
    if guidance is not None:
        body["guidance_scale"] = built.applied["guidance_scale"] = int(clamp(round(guidance), *GUIDANCE_RANGE))
    if request.seed is not None:
        # Seeds above the model's maximum wrap around: reproducible, and applied shows the one sent.
        body["seed"] = built.applied["seed"] = request.seed % (config.max_seed + 1)
    style = _preset_style(request.style, config)
    if request.style is not None and (style is None or style != request.style.upper()):
        built.ignored.append("style")
    if style is not None:
        body["presetStyle"] = built.applied["preset_style"] = style
    if config.alchemy is not None:
        body["alchemy"] = built.applied["alchemy"] = config.alchemy
    if init_image_id is not None:
        body["init_image_id"] = init_image_id
        strength = 1.0 - request.strength if request.strength is not None else config.init_strength
        if strength is not None:
            body["init_strength"] = built.applied["init_strength"] = round(clamp(strength, *INIT_STRENGTH_RANGE), 3)
    elif request.strength is not None:
        built.ignored.append("strength")  # no init image, nothing to be strong about
    if request.loras:
        body["elements"] = built.applied["elements"] = elements_of(job, config, generator=generator)
    body.update(config.arguments)
    return built


def _preset_style(style: str | None, config: LeonardoConfig) -> str | None:
    if style is not None and style.upper() in PRESET_STYLES:
        return style.upper()
    return config.preset_style


def elements_of(job: RenderJob, config: LeonardoConfig, *, generator: str) -> list[dict[str, Any]]:
    """Request LoRAs as Leonardo Elements; a name that is not an element id is refused."""
    if not config.elements:
        raise Unsupported(f"{generator}: LoRAs (Leonardo Elements) are turned off for this generator")
    bad = [lora.name for lora in job.request.loras if not UUID.match(lora.name)]
    if bad:
        raise InvalidRequest(
            f"{generator}: Leonardo takes LoRAs as Element ids (akUUID, a UUID); not: {', '.join(bad)[:200]}",
            generator=generator,
        )
    return [{"akUUID": lora.name, "weight": lora.strength} for lora in job.request.loras]


def parse_upload(payload: Any, *, generator: str) -> tuple[str, str, dict[str, str]]:
    """(init image id, presigned POST url, form fields) from ``POST /init-image``."""
    upload = _dict(payload).get("uploadInitImage")
    upload = _dict(upload)
    image_id, url, fields = upload.get("id"), upload.get("url"), upload.get("fields")
    if isinstance(fields, str):  # the API sends the form fields as a JSON-encoded string
        try:
            fields = json.loads(fields)
        except ValueError:
            fields = None
    if not (isinstance(image_id, str) and isinstance(url, str) and url.startswith(("http://", "https://"))):
        raise _malformed(generator, "the init image upload answer has no id or url")
    if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
        raise _malformed(generator, "the init image upload answer has no form fields")
    return image_id, url, {str(k): v for k, v in fields.items()}


def parse_created(payload: Any, *, generator: str) -> str:
    """The generation id from ``POST /generations``."""
    generation_id = _dict(_dict(payload).get("sdGenerationJob")).get("generationId")
    if not isinstance(generation_id, str) or not generation_id:
        raise _malformed(generator, "the create answer has no sdGenerationJob.generationId")
    return generation_id


@dataclass(frozen=True)
class Polled:
    status: str  # PENDING, COMPLETE or FAILED
    urls: list[str] = field(default_factory=list)
    seed: int | None = None


def parse_generation(payload: Any, *, generator: str, refuse_nsfw: bool) -> Polled:
    """``GET /generations/{id}``; a COMPLETE one with a flagged image is a ``ContentPolicy``."""
    if not isinstance(payload, dict) or "generations_by_pk" not in payload:
        raise _malformed(generator, "the generation answer has no generations_by_pk")
    generation = payload["generations_by_pk"]
    if generation is None:
        raise GenerationFailed(f"{generator}: Leonardo no longer knows this generation", generator=generator)
    generation = _dict(generation)
    status = generation.get("status")
    if status not in ("PENDING", "COMPLETE", "FAILED"):
        raise _malformed(generator, f"unknown generation status {str(status)[:40]!r}")
    seed = generation.get("seed")
    seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
    if status != "COMPLETE":
        return Polled(status, seed=seed)
    images = generation.get("generated_images")
    entries = [_dict(image) for image in images] if isinstance(images, list) else []
    flagged = sum(entry.get("nsfw") is True for entry in entries)
    if flagged and refuse_nsfw:
        raise ContentPolicy(
            f"{generator}: Leonardo's moderation flagged {flagged} of {len(entries)} images as NSFW",
            error_type="nsfw",
            generator=generator,
        )
    urls = [entry.get("url") for entry in entries]
    if not entries or not all(isinstance(url, str) and url.startswith(("http://", "https://")) for url in urls):
        raise _malformed(generator, "a COMPLETE generation without image URLs")
    return Polled(status, [str(url) for url in urls], seed)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _malformed(generator: str, what: str) -> GenerationFailed:
    return GenerationFailed(f"{generator}: unexpected answer from Leonardo: {what}", generator=generator)
