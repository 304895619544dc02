"""Reference-image normalization: each ``ImageSource`` of a request becomes a ``ReferenceImage``
(PNG, JPEG or WebP bytes, checked by a full decode) or a ``ReferenceImageError``.

Fetching is in ``image_server.fetch``; decoding runs in worker threads, never on the loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import threading
import warnings
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import httpx
from PIL import Image, UnidentifiedImageError

from image_server.config import ReferencesConfig
from image_server.errors import ReferenceImageError
from image_server.fetch import fetch_http_reference, read_file_reference
from image_server.generators.base import ReferenceImage
from schemas import ImageSource, RenderRequest

__all__ = [
    "decode_base64_source",
    "decode_image",
    "open_header",
    "normalize_reference",
    "normalize_references",
    "normalize_request_references",
]

# Kept byte for byte; Pillow reports some camera JPEGs as MPO, which every JPEG decoder reads.
NATIVE_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp"}
_OPENERS = ("PNG", "JPEG", "WEBP")  # the JPEG opener is the one that yields MPO
# Read, then re-encoded as PNG (first frame). Nothing else is even tried: Pillow's EPS
# plugin, for one, runs Ghostscript on its input.
CONVERTED_FORMATS = ("GIF", "BMP", "TIFF")
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})
_PNG_COMPRESS_LEVEL = 1  # about 4x faster than the default 6 (DESIGN.md); these are transient

# warnings.catch_warnings() swaps process-wide state, so threads entering it at once could
# restore each other's filters; this lock serializes that (only Image.open, the header).
_WARNINGS_LOCK = threading.Lock()


# base64 decoding holds the GIL; in chunks, the event loop's thread gets it back between
# them instead of waiting ~10 ms per 4 MB reference (measured in benchmarks/README.md).
_B64_CHUNK = 512 * 1024  # a multiple of 4


def _has_whitespace(text: str) -> bool:
    return any(c in text for c in " \n\r\t")


def _b64decode_chunked(text: str) -> bytes:
    if len(text) <= _B64_CHUNK:
        return base64.b64decode(text, validate=True)
    return b"".join(base64.b64decode(text[i : i + _B64_CHUNK], validate=True) for i in range(0, len(text), _B64_CHUNK))


def decode_base64_source(text: str, max_bytes: int) -> bytes:
    """Bytes from raw base64 or a ``data:...;base64,`` URI; whitespace is ignored.

    The size cap is checked on the base64 length before anything is decoded.
    """
    payload = text
    if text[:5].lower() == "data:":
        header, comma, payload = text.partition(",")
        if not comma:
            raise ReferenceImageError("malformed data URI (no ',' before the data)")
        if "base64" not in (part.strip().lower() for part in header[5:].split(";")[1:]):
            raise ReferenceImageError("only base64 data URIs are supported")
    if len(payload) > 4 * -(-max_bytes // 3) + len(payload) // 64 + 1024:  # generous for line breaks
        raise ReferenceImageError(f"image data is larger than the limit of {max_bytes} bytes")
    compact = "".join(payload.split()) if _has_whitespace(payload) else payload
    if len(compact) > 4 * -(-max_bytes // 3):
        raise ReferenceImageError(f"image data is larger than the limit of {max_bytes} bytes")
    compact += "=" * (-len(compact) % 4)  # tolerate stripped padding
    try:
        data = _b64decode_chunked(compact)
    except (binascii.Error, ValueError) as exc:
        raise ReferenceImageError("image data is not valid base64") from exc
    if not data:
        raise ReferenceImageError("image data is empty")
    if len(data) > max_bytes:
        raise ReferenceImageError(f"image data is larger than the limit of {max_bytes} bytes")
    return data


# Full decodes at once: one core fewer than the machine has, so ten 4096x4096 references
# cannot take every core from the event loop (they still run in parallel on big machines).
_DECODE_SLOTS = threading.BoundedSemaphore(max(1, (os.cpu_count() or 2) - 1))


def open_header(data: bytes, *, max_pixels: int) -> Image.Image:
    """Open ``data`` reading its header only, refusing unknown formats and too many pixels
    (cheap: nothing is decoded). Pillow's exceptions are translated here because a corrupt
    file can raise almost anything (OSError, SyntaxError, ValueError, struct.error, ...)."""
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            # Pillow only warns about a header claiming a huge size; a warning is not enough.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[*_OPENERS, *CONVERTED_FORMATS])
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ReferenceImageError("image header claims too many pixels (a decompression bomb)") from exc
    except UnidentifiedImageError as exc:
        raise ReferenceImageError("not a supported image (PNG, JPEG, WebP, GIF, BMP or TIFF)") from exc
    except Exception as exc:
        raise ReferenceImageError(f"image header is corrupt ({type(exc).__name__})") from exc
    width, height = image.size
    # Checked on the header, before load() allocates anything: max_pixels is ours, and
    # Image.MAX_IMAGE_PIXELS (process-wide) is neither relied on nor changed.
    if width * height > max_pixels:
        image.close()
        raise ReferenceImageError(
            f"image is {width}x{height} ({width * height} pixels), over the limit of {max_pixels} pixels"
        )
    return image


def decode_image(data: bytes, *, max_pixels: int) -> ReferenceImage:
    """Validate encoded image bytes by decoding them fully; blocking (use a worker thread).

    PNG, JPEG and WebP are returned as they are; GIF, BMP and TIFF are re-encoded as PNG.
    Pillow's exceptions are translated here because a corrupt file can raise almost anything
    (OSError, SyntaxError, ValueError, struct.error, ...) from a plugin.
    """
    image = open_header(data, max_pixels=max_pixels)
    with image:
        width, height = image.size
        try:
            with _DECODE_SLOTS:
                image.load()  # verify() checks nothing for JPEG or WebP; only decoding finds truncation
        except Exception as exc:
            raise ReferenceImageError(f"image data is truncated or corrupt ({type(exc).__name__})") from exc
        native = NATIVE_FORMATS.get(image.format or "")
        if native is not None:
            return ReferenceImage(data=data, format=native, width=width, height=height)
        return ReferenceImage(data=_to_png(image), format="png", width=width, height=height)


def _to_png(image: Image.Image) -> bytes:
    frame: Image.Image = image
    try:
        if image.mode not in _PNG_MODES:
            alpha = "A" in image.getbands() or "transparency" in image.info
            frame = image.convert("RGBA" if alpha else "RGB")
        out = io.BytesIO()
        frame.save(out, "PNG", compress_level=_PNG_COMPRESS_LEVEL)
    except Exception as exc:
        raise ReferenceImageError(f"{image.format} image could not be converted to PNG ({type(exc).__name__})") from exc
    return out.getvalue()


def _scheme(source: ImageSource) -> str:
    if source.uri is None:
        return "base64"
    scheme, colon, _ = source.uri.strip().partition(":")
    return scheme.lower() if colon else ""


def _decode_base64_sync(text: str, config: ReferencesConfig) -> ReferenceImage:
    return decode_image(decode_base64_source(text, config.max_bytes), max_pixels=config.max_pixels)


def _decode_file_sync(uri: str, config: ReferencesConfig) -> ReferenceImage:
    return decode_image(read_file_reference(uri, config), max_pixels=config.max_pixels)


def _decode_frame_sync(data: bytes | bytearray, config: ReferencesConfig) -> ReferenceImage:
    if len(data) > config.max_bytes:
        raise ReferenceImageError(f"image frame is larger than the limit of {config.max_bytes} bytes")
    return decode_image(bytes(data), max_pixels=config.max_pixels)


async def _load(
    source: ImageSource,
    config: ReferencesConfig,
    client: httpx.AsyncClient | None,
    frames: Sequence[bytes | bytearray] = (),
) -> ReferenceImage:
    if source.frame is not None:
        if source.frame >= len(frames):
            raise ReferenceImageError(f"frame {source.frame} is not in the message ({len(frames)} extra frames)")
        return await asyncio.to_thread(_decode_frame_sync, frames[source.frame], config)
    if source.image_data is not None:
        return await asyncio.to_thread(_decode_base64_sync, source.image_data, config)
    scheme = _scheme(source)
    uri = (source.uri or "").strip()
    if scheme == "data":
        return await asyncio.to_thread(_decode_base64_sync, uri, config)
    if scheme == "file":
        return await asyncio.to_thread(_decode_file_sync, uri, config)
    if scheme in ("http", "https"):
        data = await fetch_http_reference(uri, config, client)
        return await asyncio.to_thread(decode_image, data, max_pixels=config.max_pixels)
    raise ReferenceImageError(f"unsupported URI scheme {scheme[:16]!r} (use file://, http(s):// or data:)")


async def normalize_reference(
    source: ImageSource,
    config: ReferencesConfig,
    *,
    client: httpx.AsyncClient | None = None,
    label: str = "reference image",
    frames: Sequence[bytes | bytearray] = (),
) -> ReferenceImage:
    """Fetch, check and decode one source. Raises ``ReferenceImageError`` prefixed by ``label``.

    Without a ``client``, an http(s) source gets a short-lived one that ignores proxy
    settings from the environment (a proxy would make the address checks moot).
    """
    try:
        return await _load(source, config, client, frames)
    except ReferenceImageError as exc:
        raise ReferenceImageError(f"{label}: {exc.message}") from exc


@asynccontextmanager
async def _shared_client(
    client: httpx.AsyncClient | None, sources: Sequence[ImageSource]
) -> AsyncIterator[httpx.AsyncClient | None]:
    if client is not None or not any(_scheme(source) in ("http", "https") for source in sources):
        yield client
        return
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False) as own:
        yield own


async def _normalize_labelled(
    items: Sequence[tuple[str, ImageSource]],
    config: ReferencesConfig,
    client: httpx.AsyncClient | None,
    frames: Sequence[bytes | bytearray] = (),
) -> list[ReferenceImage]:
    """All sources at once; the first failure cancels the rest and is raised."""
    if not items:
        return []
    async with _shared_client(client, [source for _, source in items]) as shared:
        tasks = [
            asyncio.ensure_future(normalize_reference(source, config, client=shared, label=label, frames=frames))
            for label, source in items
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:  # in order, so the lowest failing index wins a tie
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error
    return [task.result() for task in tasks]


async def normalize_references(
    sources: Sequence[ImageSource], config: ReferencesConfig, *, client: httpx.AsyncClient | None = None
) -> list[ReferenceImage]:
    """Normalize several sources concurrently, in their order. Errors name the index
    (``reference image 2: ...``)."""
    items = [(f"reference image {index}", source) for index, source in enumerate(sources)]
    return await _normalize_labelled(items, config, client)


async def normalize_request_references(
    request: RenderRequest,
    config: ReferencesConfig,
    *,
    client: httpx.AsyncClient | None = None,
    frames: Sequence[bytes | bytearray] = (),
) -> tuple[list[ReferenceImage], ReferenceImage | None]:
    """(the images of ``request.all_references()``, the depth map or None), fetched together.

    A ``ReferenceImageError`` carries the request's id.
    """
    items = [(f"reference image {index}", source) for index, source in enumerate(request.all_references())]
    if request.depth_map is not None:
        items.append(("depth map", request.depth_map))
    try:
        images = await _normalize_labelled(items, config, client, frames)
    except ReferenceImageError as exc:
        exc.request_id = request.request_id
        raise
    if request.depth_map is not None:
        return images[:-1], images[-1]
    return images, None
