"""Shared plumbing for HTTP-based strategies: client lifecycle, keys, error translation, downloads.

Each remote strategy translates provider errors into ``image_server.errors`` at its own
boundary. What they share lives here, once: the ``HTTPGenerator`` base (one client per
generator, opened once), the status table that maps HTTP statuses (and providers' own
numeric codes) to our error classes, and the transport-error translator (after httpx's
``map_httpcore_exceptions``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import logging
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Container, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic import SecretStr

from image_server.errors import (
    GenerationFailed,
    GenerationTimeout,
    GeneratorUnavailable,
    RateLimited,
)
from image_server.generators.base import Generator

T = TypeVar("T")
logger = logging.getLogger(__name__)
# Big enough for a 4096x4096 PNG, small enough that a hostile server can't fill memory.
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024


def read_api_key(env_var: str, *, generator: str, environ: Mapping[str, str] = os.environ) -> SecretStr:
    """The key from the environment variable named in config; never from config itself."""
    value = environ.get(env_var, "").strip()
    if not value:
        raise GeneratorUnavailable(
            f"generator {generator!r} needs an API key in the environment variable {env_var}", generator=generator
        )
    return SecretStr(value)


def scrub(text: str, *secrets: str) -> str:
    """Remove every secret from ``text`` (provider error bodies sometimes echo headers)."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date), ``None`` if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, parsed.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class StatusRule:
    """One row of a status table: which statuses, what they become, and how they are worded."""

    statuses: Container[int]
    error: type[GenerationFailed]
    retryable: bool
    wording: str | None = None  # replaces "HTTP <status>" in the message


# Most specific first; the first row whose statuses contain the status wins. Strategies put
# their providers' own codes in front (``rules=KIE_RULES + STATUS_RULES``). Content-policy
# refusals are provider-specific and detected by each strategy before this table.
STATUS_RULES: tuple[StatusRule, ...] = (
    StatusRule({429}, RateLimited, True),
    StatusRule({401, 403}, GenerationFailed, False, "authentication failed"),
    StatusRule({402}, GenerationFailed, False, "payment required (out of credits?)"),
    StatusRule({408}, GenerationFailed, True),
    StatusRule(range(500, 600), GenerationFailed, True),
)


def error_for_status(
    status: int,
    detail: str,
    *,
    generator: str,
    retry_after: float | None = None,
    error_type: str | None = None,
    rules: tuple[StatusRule, ...] = STATUS_RULES,
    label: str = "HTTP",
) -> GenerationFailed:
    """The error for a failure status, from the first matching row of ``rules``.

    A status no row names (400, 404, 413, 422, ...) is a non-retryable ``GenerationFailed``.
    ``label`` names what the number is, for providers that put their own codes in the body
    (Kie answers HTTP 200 with ``"code": 402``).
    """
    rule = next((rule for rule in rules if status in rule.statuses), None)
    error, retryable = (rule.error, rule.retryable) if rule else (GenerationFailed, False)
    what = f"{rule.wording} ({label} {status})" if rule and rule.wording else f"{label} {status}"
    text = f"{generator}: {what}: {detail}" if detail else f"{generator}: {what}"
    return error(
        text, status=status, generator=generator, retryable=retryable, retry_after=retry_after, error_type=error_type
    )


@contextmanager
def translate_transport_errors(generator: str, *secrets: str) -> Iterator[None]:
    """httpx transport failures -> ``GenerationTimeout`` / retryable ``GenerationFailed``."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise GenerationTimeout(
            f"{generator}: provider did not answer in time ({type(exc).__name__})", generator=generator
        ) from exc
    except httpx.TransportError as exc:
        message = scrub(f"{generator}: could not reach the provider: {type(exc).__name__}: {exc}", *secrets)
        raise GenerationFailed(message, generator=generator, retryable=True) from exc


async def download(
    client: httpx.AsyncClient, url: str, *, generator: str, max_bytes: int = MAX_DOWNLOAD_BYTES
) -> bytes:
    """GET a result URL with a size cap; errors are translated like any provider call.

    Pass a client without credentials in its default headers: result URLs are often on
    another host (a CDN), which must never receive the provider key.
    """
    if url.startswith("data:"):
        return decode_data_uri(url, generator=generator)
    with translate_transport_errors(generator):
        async with client.stream("GET", url) as response:
            if response.status_code >= 400:
                raise error_for_status(response.status_code, "downloading the result image failed", generator=generator)
            chunks: list[bytes] = []
            total = 0
            async for chunk in response.aiter_bytes():
                total += len(chunk)
                if total > max_bytes:
                    raise GenerationFailed(
                        f"{generator}: result image is larger than {max_bytes} bytes", generator=generator
                    )
                chunks.append(chunk)
    return b"".join(chunks)


async def gather_or_cancel(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Run concurrently; the first failure cancels the rest (gather alone would leave them running)."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def download_all(http: httpx.AsyncClient, urls: list[str], *, generator: str) -> list[bytes]:
    """Download every URL concurrently (see ``download``); the first failure cancels the rest."""
    return await gather_or_cancel(download(http, url, generator=generator) for url in urls)


def json_or_none(response: httpx.Response) -> Any:
    """The response body as JSON, or ``None`` when it is not JSON."""
    try:
        return response.json()
    except ValueError:
        return None


def backoff_delays(first: float, factor: float, cap: float) -> Iterator[float]:
    """Poll delays: ``first``, then each ``factor`` times the last, never above ``cap``."""
    delay = first
    while True:
        yield min(delay, cap)
        delay = min(delay * factor, cap)


async def poll_answers(
    fetch: Callable[[], Awaitable[T]],
    *,
    first: float,
    factor: float,
    cap: float,
    tolerated: int,
    what: str,
) -> AsyncGenerator[T, None]:
    """Each answer of ``fetch``, called after growing delays (``backoff_delays``), for a remote
    job the caller follows until it says the job ended.

    Up to ``tolerated`` retryable failures in a row are waited out (honouring their
    ``retry_after``, at most ``cap``) rather than raised: the job runs on at the provider and
    is billed, so failing the render would make a retry pay for a second one.
    """
    delays = backoff_delays(first, factor, cap)
    failures = 0
    while True:
        await asyncio.sleep(next(delays))
        try:
            answer = await fetch()
        except GenerationFailed as exc:
            failures += 1
            if not exc.retryable or failures > tolerated:
                raise
            logger.info("%s: poll failed (%d in a row), polling on: %s", what, failures, exc)
            await asyncio.sleep(min(exc.retry_after or 0.0, cap))
            continue
        failures = 0
        yield answer


def decode_base64_image(data: str, *, generator: str) -> bytes:
    """Base64 from a provider response; a malformed payload is a ``GenerationFailed``."""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise GenerationFailed(
            f"{generator}: provider returned malformed base64 image data", generator=generator
        ) from exc


def decode_data_uri(uri: str, *, generator: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or ";base64" not in header:
        raise GenerationFailed(f"{generator}: provider returned an unsupported data URI", generator=generator)
    return decode_base64_image(payload, generator=generator)


class HTTPGenerator(Generator):
    """Base of strategies that call one HTTP API. The config needs ``base_url``,
    ``request_timeout_s`` (or None for ``timeout_s``)."""

    _client: httpx.AsyncClient | None = None

    def read_credentials(self) -> None:
        """Read keys from ``self.environ``; raise ``GeneratorUnavailable`` if one is unset."""

    async def open(self) -> None:
        if self._client is not None:
            return
        self.read_credentials()
        seconds = getattr(self.config, "request_timeout_s", None) or self.config.timeout_s
        timeout = httpx.Timeout(seconds, connect=min(10.0, seconds))
        self._client = httpx.AsyncClient(base_url=getattr(self.config, "base_url", ""), timeout=timeout)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def require_open(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError(f"generator {self.name!r} is not open; use 'async with generator:' or call open() first")
        return self._client
