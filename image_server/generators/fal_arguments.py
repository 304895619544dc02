"""Map a ``RenderRequest`` onto one fal endpoint's arguments, recording what was applied or ignored.

Pure functions: no I/O, no fal_client. Request values win over the configured defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from image_server.generators.fal_spec import EndpointSpec, FalConfig, FalFormat
from schemas import RenderRequest


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

    if spec.max_images > 1 or request.num_images > 1:
        args["num_images"] = request.num_images
    if image_url is not None:
        args[spec.image_field] = image_url

    result.output_format = output_format_for(config, request)
    args[spec.format_field] = applied["output_format"] = result.output_format
    args["enable_safety_checker"] = applied["enable_safety_checker"] = config.enable_safety_checker
    result.ignored = list(dict.fromkeys(result.ignored))
    return result
