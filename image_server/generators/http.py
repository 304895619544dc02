"""Shared plumbing for HTTP-based strategies: keys, error translation, downloads.

Each remote strategy translates provider errors into ``image_server.errors`` at its own
boundary; the HTTP status -> error class mapping they share lives here, once.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import httpx
from pydantic import SecretStr

from image_server.errors import (
    GenerationFailed,
    GenerationTimeout,
    GeneratorUnavailable,
    RateLimited,
)

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


def error_for_status(
    status: int,
    detail: str,
    *,
    generator: str,
    retry_after: float | None = None,
    error_type: str | None = None,
) -> GenerationFailed:
    """The error class and retryability for an HTTP failure status.

    429 -> ``RateLimited`` (retryable, honours Retry-After); 408, 5xx -> retryable;
    auth (401/403), bad request (400/404/413/422) and anything else -> not retryable.
    Content-policy refusals are provider-specific and detected by each strategy first.
    """
    text = f"{generator}: HTTP {status}: {detail}" if detail else f"{generator}: HTTP {status}"
    if status == 429:
        return RateLimited(text, status=status, retry_after=retry_after, generator=generator, error_type=error_type)
    if status in (401, 403):
        text = f"{generator}: authentication failed (HTTP {status}): {detail}"
        return GenerationFailed(text, status=status, generator=generator, retryable=False, error_type=error_type)
    retryable = status == 408 or status >= 500
    return GenerationFailed(
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


def image_format_of(data: bytes) -> str | None:
    """png / jpeg / webp from magic bytes, without decoding."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None
