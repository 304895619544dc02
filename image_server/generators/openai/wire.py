"""OpenAI Images response parsing and error fields (blocking parts run in threads)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import httpx

from image_server.errors import GenerationFailed
from image_server.generators.base import GeneratedImage
from image_server.generators.http import decode_base64_image, parse_retry_after, scrub

MAX_RESULT_PIXELS = 64 * 1024 * 1024  # far above any size OpenAI makes; a header claiming more is hostile


@dataclass
class ResultItem:
    """One entry of a response's ``data``: decoded bytes, or a URL to fetch or pass on."""

    data: bytes | None = None
    url: str | None = None
    revised_prompt: str | None = None


def parse_payload(body: bytes, generator: str) -> list[ResultItem]:
    """Blocking (JSON with base64 images can be tens of MiB): run in a thread."""
    try:
        payload = json.loads(body)
        items = payload["data"]
        if not isinstance(items, list) or not items:
            raise ValueError("'data' is empty")
        parsed: list[ResultItem] = []
        for entry in items:
            b64, url, revised = entry.get("b64_json"), entry.get("url"), entry.get("revised_prompt")
            revised = revised if isinstance(revised, str) else None
            if isinstance(b64, str) and b64:
                parsed.append(ResultItem(data=decode_base64_image(b64, generator=generator), revised_prompt=revised))
            elif isinstance(url, str) and url.startswith(("https://", "http://", "data:")):
                parsed.append(ResultItem(url=url, revised_prompt=revised))
            else:
                raise ValueError("an image has neither b64_json nor url")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise GenerationFailed(f"{generator}: malformed response from OpenAI: {exc}", generator=generator) from exc
    return parsed


def inspect_image(data: bytes, generator: str) -> GeneratedImage:
    """Format and size from the header only (blocking: run in a thread)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (width, height) = (img.format or "").lower(), img.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise GenerationFailed(f"{generator}: OpenAI returned data that is not an image", generator=generator) from exc
    if fmt not in ("png", "jpeg", "webp") or width * height > MAX_RESULT_PIXELS:
        message = f"{generator}: OpenAI returned an unusable image ({fmt or 'unknown format'} {width}x{height})"
        raise GenerationFailed(message, generator=generator)
    return GeneratedImage(data=data, format=fmt, width=width, height=height)


def retry_after_of(headers: httpx.Headers) -> float | None:
    """``retry-after-ms`` (OpenAI's precise form) first, then ``Retry-After``."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    return parse_retry_after(headers.get("retry-after"))


def error_fields(response: httpx.Response, key: str) -> tuple[str, str | None, str | None]:
    """(message, type, code) from ``{"error": {...}}``, or the start of a non-JSON body (scrubbed
    before it is cut: a key straddling the cut would otherwise leave half of it)."""
    try:
        error = response.json().get("error")
        message = error.get("message") or ""
        kind, code = error.get("type"), error.get("code")
        return str(message), kind if isinstance(kind, str) else None, code if isinstance(code, str) else None
    except (ValueError, AttributeError):
        return scrub(response.text, key)[:300].strip(), None, None
