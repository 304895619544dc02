"""fal's wire format: a ``RenderRequest`` mapped onto one endpoint's arguments (recording what was
applied or ignored), and an endpoint's output parsed and its images fetched.

No fal_client here. Request values win over the configured defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from image_server.errors import ContentPolicy, GenerationFailed, Unsupported
from image_server.formats import image_format_of
from image_server.generators.base import GeneratedImage
from image_server.generators.fal.config import EndpointSpec, FalConfig, FalFormat
from image_server.generators.http import download_all
from schemas import RenderRequest

FORMATS_BY_MIME = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/webp": "webp"}


@dataclass
class FalArguments:
    """The JSON body for the endpoint, plus what it means for the caller."""

    arguments: dict[str, Any]
    applied: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    output_format: FalFormat = "png"


def map_steps(steps: int, spec: EndpointSpec) -> int:
    """The nearest step count the endpoint takes (ties go to the larger, better-quality value)."""
    if spec.steps_choices is not None:
        return min(spec.steps_choices, key=lambda choice: (abs(choice - steps), -choice))
    if spec.steps_range is not None:
        low, high = spec.steps_range
        return max(low, min(high, steps))
    return steps


def output_format_for(config: FalConfig, request: RenderRequest) -> FalFormat:
    """The configured format, else the request's; fal makes no webp, so png (lossless) stands in."""
    if config.output_format is not None:
        return config.output_format
    return "jpeg" if request.output_format == "jpeg" else "png"


def build_arguments(
    config: FalConfig,
    request: RenderRequest,
    *,
    image_url: str | None = None,
    ignored: list[str] | None = None,
) -> FalArguments:
    """Arguments for ``config.endpoint``. ``ignored`` starts from ``check_request``'s soft list;
    a size the endpoint cannot take is added to it."""
    spec = config.spec
    args: dict[str, Any] = dict(config.arguments)
    result = FalArguments(arguments=args, ignored=list(ignored or []))
    applied = result.applied
    applied["endpoint"] = config.endpoint
    args["prompt"] = request.prompt

    if spec.seed and request.seed is not None:
        args["seed"] = applied["seed"] = request.seed
    if spec.negative_prompt and request.negative_prompt is not None:
        args["negative_prompt"] = request.negative_prompt

    explicit_size = request.width is not None or request.height is not None
    if spec.image_size:
        if explicit_size:
            # An unset side falls back to 1024, as RenderJob.width/height do.
            size = {"width": request.width or 1024, "height": request.height or 1024}
            args["image_size"] = applied["image_size"] = size
        elif config.image_size is not None:
            args["image_size"] = applied["image_size"] = config.image_size
    elif explicit_size:
        result.ignored.extend(side for side in ("width", "height") if getattr(request, side) is not None)

    steps = request.steps if request.steps is not None else config.num_inference_steps
    if spec.takes_steps and steps is not None:
        mapped = map_steps(steps, spec)
        args["num_inference_steps"] = str(mapped) if spec.steps_choices is not None else mapped
        applied["steps"] = mapped

    guidance = request.guidance_scale if request.guidance_scale is not None else config.guidance_scale
    if spec.guidance_scale and guidance is not None:
        args["guidance_scale"] = applied["guidance_scale"] = guidance

    strength = request.strength if request.strength is not None else config.strength
    if spec.strength and image_url is not None and strength is not None:
        args["strength"] = applied["strength"] = strength

    if spec.loras and request.loras:
        if len(request.loras) > spec.max_loras:
            raise Unsupported(
                f"{config.endpoint} takes at most {spec.max_loras} LoRAs, not {len(request.loras)}",
                request_id=request.request_id,
            )
        # fal's LoRA endpoints take a weights URL (or a name fal resolves) as ``path``.
        args["loras"] = [{"path": lora.name, "scale": lora.strength} for lora in request.loras]
        applied["loras"] = [{"name": lora.name, "strength": lora.strength} for lora in request.loras]

    if spec.max_images > 1 or request.num_images > 1:
        args["num_images"] = request.num_images
    if image_url is not None:
        args[spec.image_field] = image_url

    result.output_format = output_format_for(config, request)
    args[spec.format_field] = applied["output_format"] = result.output_format
    args["enable_safety_checker"] = applied["enable_safety_checker"] = config.enable_safety_checker
    result.ignored = list(dict.fromkeys(result.ignored))
    return result


@dataclass(frozen=True)
class FalImage:
    url: str
    width: int | None = None
    height: int | None = None
    format: str | None = None  # from the output's content_type, if it names one we know


@dataclass(frozen=True)
class FalOutput:
    images: list[FalImage]
    seed: int | None = None
    prompt: str | None = None


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def parse_output(output: Any, *, generator: str, request_id: str | None = None) -> FalOutput:
    """Validate the output's shape; raise ``ContentPolicy`` if the safety checker flagged any image.

    fal does not fail a flagged request: it returns a blanked (black) image and sets
    ``has_nsfw_concepts``. A black image is not a success, so the whole request fails with
    ``content_policy`` rather than returning some images and a hole.
    """

    def malformed(reason: str) -> GenerationFailed:
        return GenerationFailed(
            f"{generator}: fal returned a malformed result: {reason}", generator=generator, request_id=request_id
        )

    if not isinstance(output, dict):
        raise malformed(f"expected a JSON object, got {type(output).__name__}")
    raw_images = output.get("images")
    if not isinstance(raw_images, list) or not raw_images:
        raise malformed("no images")
    flags = output.get("has_nsfw_concepts")
    if isinstance(flags, list) and any(flag is True for flag in flags):
        flagged = sum(1 for flag in flags if flag is True)
        raise ContentPolicy(
            f"{generator}: fal's safety checker flagged {flagged} of {len(raw_images)} images",
            error_type="has_nsfw_concepts",
            generator=generator,
            request_id=request_id,
        )
    images = []
    for raw in raw_images:
        url = raw.get("url") if isinstance(raw, dict) else None
        if not isinstance(url, str) or not url:
            raise malformed("an image has no url")
        content_type = raw.get("content_type")
        images.append(
            FalImage(
                url=url,
                width=_positive_int(raw.get("width")),
                height=_positive_int(raw.get("height")),
                format=FORMATS_BY_MIME.get(content_type.lower()) if isinstance(content_type, str) else None,
            )
        )
    seed = output.get("seed")
    prompt = output.get("prompt")
    return FalOutput(
        images=images,
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        prompt=prompt if isinstance(prompt, str) else None,
    )


async def fetch_images(
    http: httpx.AsyncClient,
    output: FalOutput,
    *,
    pass_urls: bool,
    requested_format: str,
    generator: str,
) -> list[GeneratedImage]:
    """URLs untouched when ``pass_urls`` (delivery ``url``), else the downloaded bytes."""
    if pass_urls:
        return [
            GeneratedImage(
                url=image.url,
                width=image.width,
                height=image.height,
                format=image.format or requested_format,
                seed=output.seed,
            )
            for image in output.images
        ]
    blobs = await download_all(http, [image.url for image in output.images], generator=generator)
    results = []
    for image, data in zip(output.images, blobs, strict=True):
        fmt = image_format_of(data)
        if fmt is None:
            raise GenerationFailed(f"{generator}: a result image is not PNG, JPEG or WebP", generator=generator)
        results.append(GeneratedImage(data=data, format=fmt, width=image.width, height=image.height, seed=output.seed))
    return results
