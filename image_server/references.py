"""Reference-image normalization: each ``ImageSource`` of a request becomes a ``ReferenceImage``
(PNG, JPEG or WebP bytes, checked by a full decode) or a ``ReferenceImageError``.

Fetching is in ``image_server.fetch``; decoding runs in worker threads, never on the loop.
"""

from __future__ import annotations

import asyncio
import functools
import io
import os
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import ParamSpec, TypeVar

import httpx
from PIL import Image, TiffImagePlugin, UnidentifiedImageError, WebPImagePlugin

from image_server.config import ReferencesConfig
from image_server.errors import ReferenceImageError
from image_server.fetch import fetch_http_reference, read_file_reference
from image_server.generators.base import ReferenceImage
from image_server.inline_data import decode_base64_source
from image_server.offload import in_gil_bound_thread
from schemas import ImageSource, RenderRequest

# Every plugin an opener below may need is registered at import (service start): left to
# the first request, Image.open imported (and, without cached bytecode, compiled) them on
# that request's thread, and a GIF, BMP or TIFF made it import all ~40 (Image.init).
Image.preinit()  # BMP, GIF, JPEG, PNG (and PPM)
_REGISTERED = (TiffImagePlugin, WebPImagePlugin)

__all__ = [
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


# References decoded (or read) at once: one core fewer than the machine has, so they cannot
# take every core from the event loop. It also keeps the queue for the GIL short: with six
# threads taking turns, the loop's thread waited up to five turns of the switch interval.
# Base64 is decoded before, on offload's one GIL-bound thread (it holds the GIL throughout).
_DECODE_SLOTS = threading.BoundedSemaphore(max(1, (os.cpu_count() or 2) - 1))

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _one_slot(work: Callable[_P, _T]) -> Callable[_P, _T]:
    @functools.wraps(work)
    def in_slot(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        with _DECODE_SLOTS:
            return work(*args, **kwargs)

    return in_slot


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
        native = NATIVE_FORMATS.get(image.format or "")
        if native == "jpeg":
            # At 1/8 scale libjpeg still reads every byte of the entropy-coded data, so a
            # truncated or corrupt file fails exactly as at full size (tests compare both);
            # it writes 64x fewer pixels, and a 4096x4096 photo no longer needs 64 MB
            # (whose zeroing, in Pillow's allocation, held the GIL for 7-15 ms).
            image.draft(None, (1, 1))
        try:
            image.load()  # verify() checks nothing for JPEG or WebP; only decoding finds truncation
        except Exception as exc:
            raise ReferenceImageError(f"image data is truncated or corrupt ({type(exc).__name__})") from exc
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


@_one_slot
def _decode_file_sync(uri: str, config: ReferencesConfig) -> ReferenceImage:
    return decode_image(read_file_reference(uri, config), max_pixels=config.max_pixels)


@_one_slot
def _decode_base64_sync(text: str, config: ReferencesConfig) -> ReferenceImage:
    # Inside the slot, so base64 is decoded for the reference about to be decoded, not for
    # all ten at once (a GIL-hungry thread running flat out for 80 ms delayed the loop by
    # up to 12 ms); on the GIL-bound thread, which runs at the loop's priority.
    data = in_gil_bound_thread(decode_base64_source, text, config.max_bytes)
    return decode_image(data, max_pixels=config.max_pixels)


@_one_slot
def _decode_fetched_sync(data: bytes, config: ReferencesConfig) -> ReferenceImage:
    return decode_image(data, max_pixels=config.max_pixels)


@_one_slot
def _decode_frame_sync(data: bytes | bytearray, config: ReferencesConfig) -> ReferenceImage:
    if len(data) > config.max_bytes:
        raise ReferenceImageError(f"image frame is larger than the limit of {config.max_bytes} bytes")
    # A big frame arrives as a bytearray; its copy to bytes holds the GIL throughout.
    encoded = data if isinstance(data, bytes) else in_gil_bound_thread(bytes, data)
    return decode_image(encoded, max_pixels=config.max_pixels)


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
        return await asyncio.to_thread(_decode_fetched_sync, data, config)
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
