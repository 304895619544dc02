"""Leonardo error bodies -> our errors.

Leonardo answers errors Hasura-style, ``{"error": "<text>", "path": "$", "code": "<kind>"}``;
which HTTP status goes with each is UNCONFIRMED, so the ``code`` and the wording decide where
the status alone cannot.
"""

from __future__ import annotations

import re
from typing import Any

import httpx

from image_server.errors import ContentPolicy, GenerationFailed
from image_server.generators.http import error_for_status, json_or_none, parse_retry_after, scrub

MAX_DETAIL_CHARS = 300
# Hasura codes (and wordings) that mean the key was refused, whatever status came with them.
AUTH_CODES = frozenset({"access-denied", "invalid-jwt", "invalid-headers"})
AUTH_WORDING = re.compile(r"authori[sz]ation hook|unauthori[sz]ed", re.IGNORECASE)
# Prompt moderation refusals (exact format UNCONFIRMED): recognised by wording.
POLICY_WORDING = re.compile(r"moderat|nsfw|content polic|inappropriate|not allowed by our", re.IGNORECASE)


def leonardo_error(response: httpx.Response, *, generator: str, key: str, what: str) -> GenerationFailed:
    """The error for a failed call; ``what`` names the call ("creating the generation", ...)."""
    payload = json_or_none(response)
    body = payload if isinstance(payload, dict) else {}
    text = body.get("error") if isinstance(body.get("error"), str) else response.text
    code = body.get("code") if isinstance(body.get("code"), str) else None
    detail = scrub(f"{what}: {text}" if text else what, key)[:MAX_DETAIL_CHARS]  # scrub, then cut
    status = response.status_code if response.status_code >= 400 else 400
    if POLICY_WORDING.search(text or ""):
        return ContentPolicy(
            f"{generator}: refused by Leonardo's moderation: {detail}",
            status=status,
            error_type=code,
            generator=generator,
        )
    if code in AUTH_CODES or AUTH_WORDING.search(text or ""):
        status = status if status in (401, 403) else 401
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    return error_for_status(status, detail, generator=generator, retry_after=retry_after, error_type=code)


def error_in_body(payload: Any) -> bool:
    """A 2xx answer that is an error body all the same (Hasura answers some errors with 200)."""
    return isinstance(payload, dict) and isinstance(payload.get("error"), str)
