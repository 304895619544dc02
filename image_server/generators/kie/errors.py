"""Kie's ``{"code", "msg", "data"}`` envelope checked, and its business codes mapped to our errors.

Kie may answer HTTP 200 with a failure code in the body (API_CONTRACTS.md section 5 leaves
open whether the HTTP status mirrors it), so the body ``code`` is read whatever the status.
"""

from __future__ import annotations

import re
from typing import Any

import httpx

from image_server.errors import ContentPolicy, GenerationFailed
from image_server.generators.http import STATUS_RULES, StatusRule, error_for_status, parse_retry_after, scrub

MAX_DETAIL_CHARS = 300
# Kie's own codes, in front of the shared table (which covers 401, 429 and the other 5xx).
KIE_RULES: tuple[StatusRule, ...] = (
    StatusRule({402}, GenerationFailed, False, "insufficient credits"),
    StatusRule({422}, GenerationFailed, False, "validation error"),
    StatusRule({433}, GenerationFailed, False, "sub-key usage limit reached"),
    StatusRule({455}, GenerationFailed, True, "service unavailable (maintenance)"),
    StatusRule({500}, GenerationFailed, True, "server error"),
    # A generation failure is not retried: each try is a new, billed task.
    StatusRule({501}, GenerationFailed, False, "generation failed"),
    StatusRule({505}, GenerationFailed, False, "feature disabled"),
)
RULES = KIE_RULES + STATUS_RULES
# Kie documents no failCode for a moderation refusal (UNCONFIRMED): recognise it by wording.
POLICY_WORDING = re.compile(r"sensitive|nsfw|unsafe content|content.?polic|moderat|inappropriate", re.IGNORECASE)
# Codes whose message may be a refusal; a 422 naming "nsfw_checker" is a validation error.
POLICY_CODES = frozenset({400, 451, 501})


def detail_of(text: str, key: str) -> str:
    """Scrubbed, then cut: a key straddling the cut would otherwise leave part of itself."""
    text = scrub(text, key)
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 3] + "..."


def message_of(body: Any) -> str:
    """The envelope's message: Kie uses ``msg`` on most endpoints and ``message`` on some."""
    if not isinstance(body, dict):
        return ""
    for name in ("msg", "message"):
        if isinstance(body.get(name), str) and body[name]:
            return str(body[name])
    return ""


def kie_error(
    code: int, message: str, *, generator: str, key: str, retry_after: float | None = None, label: str = "code"
) -> GenerationFailed:
    """A business (or HTTP) code and Kie's message as one of our errors; refusals by wording."""
    detail = detail_of(message, key)
    if code in POLICY_CODES and POLICY_WORDING.search(message):
        return ContentPolicy(
            f"{generator}: refused by Kie's content moderation ({label} {code}): {detail}",
            status=code,
            error_type=str(code),
            generator=generator,
        )
    return error_for_status(
        code, detail, generator=generator, retry_after=retry_after, error_type=str(code), rules=RULES, label=label
    )


def read_envelope(response: httpx.Response, *, generator: str, key: str) -> Any:
    """``data`` of a successful envelope; otherwise the error its code (or HTTP status) names."""
    try:
        body = response.json()
    except ValueError:
        body = None
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    code = body.get("code") if isinstance(body, dict) else None
    if not isinstance(code, int) or isinstance(code, bool):
        code = None
    failed = isinstance(body, dict) and body.get("success") is False  # the upload API adds "success"
    if response.status_code >= 400:
        text = message_of(body) or response.text
        if code is not None and code != 200:
            raise kie_error(code, text, generator=generator, key=key, retry_after=retry_after)
        raise kie_error(response.status_code, text, generator=generator, key=key, retry_after=retry_after, label="HTTP")
    if not isinstance(body, dict):
        raise GenerationFailed(
            f"{generator}: Kie answered HTTP {response.status_code} with a body that is not a JSON envelope",
            status=response.status_code,
            generator=generator,
        )
    if code is None:
        raise GenerationFailed(f"{generator}: Kie's answer has no code", generator=generator)
    if code != 200 or failed:
        raise kie_error(code if code != 200 else 500, message_of(body), generator=generator, key=key)
    return body.get("data")


def task_failure(fail_code: Any, fail_message: Any, *, generator: str, key: str) -> GenerationFailed:
    """A task that ended in state ``fail``: a refusal by wording, else its ``failCode`` mapped.

    Only codes the table marks retryable (455, 500) are retried; any other failure is final,
    since a retry is a new, billed task.
    """
    message = str(fail_message or "no reason given")
    code = int(fail_code) if str(fail_code).strip().isdigit() else None
    if POLICY_WORDING.search(message):
        return ContentPolicy(
            f"{generator}: refused by Kie's content moderation (task failed, failCode {fail_code}): "
            f"{detail_of(message, key)}",
            error_type=str(fail_code),
            generator=generator,
        )
    if code is not None and 400 <= code < 600:
        return kie_error(code, message, generator=generator, key=key, label="task failed, failCode")
    return GenerationFailed(
        f"{generator}: the task failed (failCode {detail_of(str(fail_code), key)}): {detail_of(message, key)}",
        error_type=str(fail_code),
        generator=generator,
    )
