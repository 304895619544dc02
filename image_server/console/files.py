"""Files the console serves: only regular files below the output dir, read off the event loop.

A path from the browser is split into components and walked with ``O_NOFOLLOW`` below the
resolved output dir (the same walk that guards ``file://`` references), so ``..``, absolute
paths, symlinks and FIFOs never lead anywhere.
"""

from __future__ import annotations

from pathlib import Path

from image_server.errors import ReferenceImageError
from image_server.fetch import read_below
from image_server.formats import image_format_of

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
MAX_IMAGE_BYTES = 256 * 1024 * 1024


class NotServed(LookupError):
    """The path names nothing the console may serve (answered with 404, saying no more)."""


def split_relative(relative: str) -> tuple[str, ...]:
    """Components of a path relative to the output dir; ``NotServed`` for anything odd."""
    parts = tuple(relative.split("/"))
    if not relative or relative.startswith("/") or "\\" in relative or "\x00" in relative:
        raise NotServed(relative)
    if any(part in ("", ".", "..") for part in parts) or Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
        raise NotServed(relative)
    return parts


def read_image(root: Path, relative: str) -> tuple[bytes, str]:
    """(bytes, content type) of an image below ``root`` (blocking: run in a thread)."""
    parts = split_relative(relative)
    try:
        data = read_below(root.resolve(), parts, MAX_IMAGE_BYTES, relative)
    except (ReferenceImageError, OSError) as exc:
        raise NotServed(relative) from exc
    fmt = image_format_of(data)
    if fmt is None:
        raise NotServed(relative)
    return data, CONTENT_TYPES[fmt]
