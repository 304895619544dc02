"""Translate fal-client and httpx failures into ``image_server.errors``, scrubbed of the key.

The one boundary where fal exceptions are caught (providers/API_CONTRACTS.md section 1.4).
Call ``translate_fal_errors`` only once ``fal_client`` is imported (after ``open()``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx

from image_server.errors import ContentPolicy, GenerationFailed, GenerationTimeout, ImageServerError
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
    """Wrap fal-client calls (and result downloads): everything leaves as an ``ImageServerError``."""
    import fal_client

    secrets = secrets_of(key)
    try:
        with translate_transport_errors(generator, *secrets):
            yield
    except ImageServerError as exc:
        if exc.request_id is None:
            exc.request_id = request_id
        raise
    # "from None" below: the originals carry the provider's words unscrubbed (fal echoes keys
    # back in some errors), and a traceback of a chained cause would print them.
    except fal_client.FalClientHTTPError as exc:
        raise _with_id(
            error_for_fal_http(
                exc.status_code, exc.message, exc.error_type, exc.response.headers, generator=generator, secrets=secrets
            ),
            request_id,
        ) from None
    except httpx.HTTPStatusError as exc:  # fal's CDN token refresh raises plain httpx errors
        response = exc.response
        detail = scrub(response.text, *secrets)[:MAX_DETAIL_CHARS]
        raise _with_id(error_for_status(response.status_code, detail, generator=generator), request_id) from None
    except fal_client.FalClientTimeoutError as exc:
        raise GenerationTimeout(
            f"{generator}: fal did not answer in time", generator=generator, request_id=request_id
        ) from exc
    except (KeyError, ValueError, TypeError) as exc:
        # fal-client parses JSON and indexes required keys without checks: bad JSON, a missing
        # request_id or an unknown status string surface here.
        message = scrub(f"{generator}: fal returned a malformed response ({type(exc).__name__}: {exc})", *secrets)
        raise GenerationFailed(message[:MAX_DETAIL_CHARS], generator=generator, request_id=request_id) from None


def _with_id(error: GenerationFailed, request_id: str | None) -> GenerationFailed:
    error.request_id = request_id
    return error
