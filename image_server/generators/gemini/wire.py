"""Gemini ``generateContent`` request bodies and response parsing (blocking: run in threads)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from functools import partial
from typing import Any

from image_server.errors import ContentPolicy, GenerationFailed
from image_server.formats import image_format_of
from image_server.generators.base import ReferenceImage
from image_server.generators.gemini.config import GeminiConfig
from image_server.generators.http import decode_base64_image

# A 200 with no image and one of these finish reasons is a safety/recitation refusal, not a failure.
POLICY_FINISH_REASONS = frozenset(
    "SAFETY IMAGE_SAFETY PROHIBITED_CONTENT IMAGE_PROHIBITED_CONTENT BLOCKLIST SPII RECITATION IMAGE_RECITATION".split()
)
MAX_DETAIL_CHARS = 300


def build_request_body(
    prompt: str, references: Sequence[ReferenceImage], *, config: GeminiConfig, aspect_ratio: str | None
) -> bytes:
    """The ``generateContent`` JSON body (blocking: base64 of the references)."""
    parts: list[dict[str, Any]] = [{"text": prompt}]
    for ref in references:
        parts.append({"inlineData": {"mimeType": ref.mime, "data": base64.b64encode(ref.data).decode("ascii")}})
    generation_config: dict[str, Any] = {"responseModalities": ["IMAGE"] if config.image_only else ["TEXT", "IMAGE"]}
    image_config = {"aspectRatio": aspect_ratio, "imageSize": config.image_size}
    image_config = {key: value for key, value in image_config.items() if value is not None}
    if image_config:
        generation_config["imageConfig"] = image_config
    body = {"contents": [{"role": "user", "parts": parts}], "generationConfig": generation_config}
    return json.dumps(body).encode()


def read_images(content: bytes, *, generator: str) -> tuple[list[tuple[bytes, str]], list[str]]:
    """(bytes, format) of each image and the text parts of a 200 response (blocking: JSON, base64).

    Raises ``ContentPolicy`` for a blocked prompt or image, ``GenerationFailed`` for a
    malformed response or one without an image.
    """
    try:
        payload = json.loads(content)
    except ValueError as exc:
        raise GenerationFailed(f"{generator}: provider returned malformed JSON", generator=generator) from exc
    if not isinstance(payload, dict):
        raise GenerationFailed(f"{generator}: provider returned an unexpected JSON shape", generator=generator)
    block = as_dict(payload.get("promptFeedback")).get("blockReason")
    if block:
        raise ContentPolicy(
            f"{generator}: the prompt was blocked by the provider's safety system ({block})",
            error_type=str(block),
            generator=generator,
        )
    encoded: list[str] = []
    texts: list[str] = []
    finish: str | None = None
    candidates = payload.get("candidates")
    for candidate in candidates if isinstance(candidates, list) else []:
        candidate = as_dict(candidate)
        finish = finish or candidate.get("finishReason")
        parts = as_dict(candidate.get("content")).get("parts")
        for part in parts if isinstance(parts, list) else []:
            part = as_dict(part)
            if part.get("thought"):  # 3.x models show interim "thinking" images; the answer follows
                continue
            blob = as_dict(part.get("inlineData") or part.get("inline_data"))
            mime = str(blob.get("mimeType") or blob.get("mime_type") or "image/")
            if isinstance(blob.get("data"), str) and mime.startswith("image/"):
                encoded.append(blob["data"])
            elif isinstance(part.get("text"), str):
                texts.append(part["text"])
    if not encoded:
        if finish in POLICY_FINISH_REASONS:
            raise ContentPolicy(
                f"{generator}: the image was blocked by the provider's safety system ({finish})",
                error_type=finish,
                generator=generator,
            )
        said = f"; it answered with text only: {' '.join(texts)[:MAX_DETAIL_CHARS]!r}" if texts else ""
        raise GenerationFailed(
            f"{generator}: the response held no image (finishReason {finish or 'missing'}){said}",
            error_type=finish or "NO_IMAGE",
            generator=generator,
        )
    images = []
    for data in map(partial(decode_base64_image, generator=generator), encoded):
        fmt = image_format_of(data)
        if fmt is None:
            raise GenerationFailed(f"{generator}: provider returned an image that is not PNG, JPEG or WebP")
        images.append((data, fmt))
    return images, texts


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def retry_delay_of(details: list[Any]) -> float | None:
    """``google.rpc.RetryInfo.retryDelay`` ("37s", "1.5s") from an error's details."""
    for detail in details:
        delay = as_dict(detail).get("retryDelay")
        if isinstance(delay, str) and (match := re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)s\s*", delay)):
            return float(match.group(1))
    return None
