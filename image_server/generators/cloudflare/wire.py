"""Cloudflare Workers AI requests per model family, and response parsing (blocking: run in threads)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from image_server.errors import GenerationFailed
from image_server.generators.base import ReferenceImage
from image_server.generators.cloudflare.config import CloudflareConfig
from image_server.generators.http import decode_base64_image
from schemas import RenderRequest


@dataclass
class RunRequest:
    body: dict[str, Any]
    applied: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def build_body(
    config: CloudflareConfig, request: RenderRequest, reference: ReferenceImage | None, ignored: list[str]
) -> RunRequest:
    """The JSON body for ``config.model``. ``ignored`` starts from ``check_request``'s list (the
    family's parameters decide it); width/height are added for a family that takes no size.
    Blocking only for a big reference (base64): call in a thread when there is one."""
    family = config.model_family
    # Clamping keeps a habitual "steps=30" working; applied shows what was really used.
    steps = min(request.steps or config.default_steps, config.step_limit)
    run = RunRequest({"prompt": request.prompt, family.steps_field: steps}, ignored=list(ignored))
    run.applied.update(model=config.model, steps=steps)
    if request.steps is not None and request.steps > steps:
        run.applied["steps_requested"] = request.steps
    takes = family.parameters | ({"seed"} if config.send_seed else set())
    values = {
        "seed": ("seed", request.seed),
        "negative_prompt": ("negative_prompt", request.negative_prompt),
        "guidance_scale": ("guidance", request.guidance_scale),
        "strength": ("strength", request.strength if reference is not None else None),
    }
    for name, (wire_name, value) in values.items():
        if name in takes and value is not None:
            run.body[wire_name] = run.applied[name] = value
    for side in ("width", "height"):
        value = getattr(request, side)
        if value is None:
            continue
        if family.sizes:
            run.body[side] = run.applied[side] = value
        else:
            run.ignored.append(side)  # the model's own output size (1024x1024 typical)
    if reference is not None:
        run.body["image_b64"] = base64.b64encode(reference.data).decode("ascii")
    return run


def read_image(content: bytes, content_type: str, *, generator: str) -> bytes | dict[str, Any]:
    """The image from a 2xx answer (blocking): ``{"result": {"image": b64}}`` or raw bytes;
    the envelope itself if it says ``"success": false``.

    Raises ``GenerationFailed`` for malformed JSON or an envelope without an image.
    """
    if content_type.startswith("image/"):  # some Workers AI image models answer with raw bytes
        return content
    try:
        payload = json.loads(content)
    except ValueError as exc:
        raise GenerationFailed(f"{generator}: provider returned malformed JSON", generator=generator) from exc
    if isinstance(payload, dict) and payload.get("success") is False:
        return payload
    result = payload.get("result") if isinstance(payload, dict) else None
    image = result.get("image") if isinstance(result, dict) else None
    if not isinstance(image, str) or not image:
        raise GenerationFailed(f"{generator}: the response held no image (result.image missing)", generator=generator)
    return decode_base64_image(image, generator=generator)
