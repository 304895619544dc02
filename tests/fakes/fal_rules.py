"""Input rules of the four fal endpoints we use (contract section 1.6), as the fake checks them.

Errors come back as fal does: pydantic-style ``detail`` items. Fields an endpoint does not list are
not refused: fal documents no such refusal (API_CONTRACTS.md 1.7: "real fal may ignore them"), and a
fake stricter than fal would pass nothing real. The fake lists them instead, and ``serve_fal`` fails
the test that sent any: a mapping slip that fal would silently drop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PRESETS = frozenset({"square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"})
COMMON = frozenset({"prompt", "num_inference_steps", "num_images", "seed", "enable_safety_checker", "sync_mode"})
LIGHTNING = COMMON | {"image_size", "format", "safety_checker_version", "expand_prompt", "embeddings"}
FLUX = COMMON | {"guidance_scale", "output_format", "acceleration"}
I2I = frozenset({"image_url", "strength"})


@dataclass(frozen=True)
class Rule:
    fields: frozenset[str]
    steps_enum: frozenset[str] | None = None
    steps_range: tuple[int, int] | None = None
    max_images: int = 4
    image: bool = False


RULES: dict[str, Rule] = {
    "fal-ai/fast-lightning-sdxl": Rule(LIGHTNING, steps_enum=frozenset({"1", "2", "4", "8"}), max_images=8),
    "fal-ai/fast-lightning-sdxl/image-to-image": Rule(
        LIGHTNING | I2I | {"preserve_aspect_ratio", "crop_output"},
        steps_enum=frozenset({"1", "2", "4", "8"}),
        max_images=8,
        image=True,
    ),
    "fal-ai/flux/schnell": Rule(FLUX | {"image_size"}, steps_range=(1, 12)),
    "fal-ai/flux/dev/image-to-image": Rule(FLUX | I2I, steps_range=(1, 50), image=True),
    "fal-ai/flux-lora": Rule(FLUX | {"image_size", "loras"}, steps_range=(1, 50)),
}


def _problem(field: str, msg: str, kind: str) -> dict[str, Any]:
    return {"loc": ["body", field], "msg": msg, "type": kind}


def _image_problem(url: Any, known_files: set[str]) -> str | None:
    if not isinstance(url, str):
        return "field required"
    if url.startswith("data:image/") and ";base64," in url:
        return None
    if "/files/" in url:
        return None if url.rsplit("/files/", 1)[1] in known_files else "could not download the image"
    return "expected a data URI or an uploaded file URL"


def unknown_fields(endpoint: str, args: dict[str, Any]) -> list[str]:
    """Fields of ``args`` that a known endpoint does not take (fal would drop them)."""
    rule = RULES.get(endpoint)
    return [] if rule is None else sorted(key for key in args if key not in rule.fields)


def check_arguments(endpoint: str, args: dict[str, Any], *, known_files: set[str]) -> list[dict[str, Any]]:
    """The problems fal would report for ``args`` (empty when they are acceptable)."""
    problems = []
    if not isinstance(args.get("prompt"), str) or not args["prompt"]:
        problems.append(_problem("prompt", "field required", "missing"))
    rule = RULES.get(endpoint)
    if rule is None:
        return problems
    if rule.image and (reason := _image_problem(args.get("image_url"), known_files)) is not None:
        problems.append(_problem("image_url", reason, "value_error"))
    steps = args.get("num_inference_steps")
    if steps is not None and rule.steps_enum is not None and steps not in rule.steps_enum:
        problems.append(_problem("num_inference_steps", f"must be one of {sorted(rule.steps_enum)}", "enum"))
    if steps is not None and rule.steps_range is not None:
        low, high = rule.steps_range
        if not isinstance(steps, int) or isinstance(steps, bool) or not low <= steps <= high:
            problems.append(_problem("num_inference_steps", f"must be an integer in {low}..{high}", "int_range"))
    size = args.get("image_size")
    if size is not None and not (isinstance(size, str) and size in PRESETS):
        if not (isinstance(size, dict) and all(isinstance(size.get(k), int) for k in ("width", "height"))):
            problems.append(_problem("image_size", "a preset name or {width, height}", "value_error"))
    count = args.get("num_images", 1)
    if not isinstance(count, int) or not 1 <= count <= rule.max_images:
        problems.append(_problem("num_images", f"must be in 1..{rule.max_images}", "int_range"))
    loras = args.get("loras", [])
    if not isinstance(loras, list) or not all(
        isinstance(item, dict) and isinstance(item.get("path"), str) and isinstance(item.get("scale", 1.0), int | float)
        for item in loras
    ):
        problems.append(_problem("loras", "a list of {path, scale}", "value_error"))
    fmt = args.get("format", args.get("output_format"))
    if fmt is not None and fmt not in ("jpeg", "png"):
        problems.append(_problem("output_format", "must be jpeg or png", "enum"))
    return problems
