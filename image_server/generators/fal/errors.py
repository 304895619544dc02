"""Translate fal's error answers and httpx failures into ``image_server.errors``, scrubbed of the key.

fal's error bodies are described in providers/API_CONTRACTS.md section 1.4.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx

from image_server.errors import ContentPolicy, GenerationFailed, ImageServerError
from image_server.generators.http import error_for_status, parse_retry_after, scrub, translate_transport_errors

MAX_DETAIL_CHARS = 500
# fal documents no exact content-policy type string (section 1.4, UNCONFIRMED), so match loosely.
POLICY_MARKERS = ("content_policy", "nsfw", "safety", "moderation")


def secrets_of(key: str) -> tuple[str, ...]:
    """The key and, for ``key_id:key_secret`` keys, each half: none may appear in a message."""
    return (key, *key.split(":")) if ":" in key else (key,)


def format_detail(detail: Any, *secrets: str) -> str:
    """fal's ``detail``: a string, or pydantic's list of ``{"loc", "msg", "type"}`` items; the
    ``secrets`` are scrubbed before it is cut (a key straddling the cut would leave half of it)."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, Mapping):
                loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                msg = str(item.get("msg", ""))
                parts.append(f"{loc}: {msg}" if loc else msg)
            else:
                parts.append(str(item))
        text = "; ".join(parts)
    else:
        text = str(detail)
    text = scrub(text, *secrets)
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 3] + "..."


def is_content_policy(status: int, detail: Any, error_type: str | None) -> bool:
    """A 4xx whose error_type, or any detail item's ``type``, names a content policy."""
    if not 400 <= status < 500:
        return False
    kinds = [error_type or ""]
    if isinstance(detail, list):
        kinds.extend(str(item.get("type", "")) for item in detail if isinstance(item, Mapping))
    return any(marker in kind.lower() for kind in kinds for marker in POLICY_MARKERS)


def error_for_fal_http(
    status: int,
    detail: Any,
    error_type: str | None,
    headers: httpx.Headers,
    *,
    generator: str,
    secrets: tuple[str, ...],
) -> GenerationFailed:
    """Status -> error class via ``error_for_status``; fal's ``X-Fal-Retryable`` has the last word."""
    text = format_detail(detail, *secrets)
    if is_content_policy(status, detail, error_type):
        return ContentPolicy(
            f"{generator}: refused by content policy (HTTP {status}): {text}",
            status=status,
            error_type=error_type,
            generator=generator,
        )
    retry_after = parse_retry_after(headers.get("retry-after"))
    error = error_for_status(status, text, generator=generator, retry_after=retry_after, error_type=error_type)
    hint = headers.get("x-fal-retryable", "").strip().lower()
    if hint in ("true", "false") and status not in (401, 403):
        error.retryable = hint == "true"
    return error


@contextmanager
def translate_fal_errors(generator: str, key: str, *, request_id: str | None = None) -> Iterator[None]:
    """Wrap calls to fal (and result downloads): everything leaves as an ``ImageServerError``
    carrying ``request_id``; transport failures are scrubbed of the key."""
    try:
        with translate_transport_errors(generator, *secrets_of(key)):
            yield
    except ImageServerError as exc:
        if exc.request_id is None:
            exc.request_id = request_id
        raise
