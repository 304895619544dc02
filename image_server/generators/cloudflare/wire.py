"""Cloudflare Workers AI response parsing (blocking: run in threads)."""

from __future__ import annotations

import json
from typing import Any

from image_server.errors import GenerationFailed
from image_server.generators.http import decode_base64_image


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
