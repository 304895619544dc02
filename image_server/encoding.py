"""Pixels to bytes with the service's one set of encoder settings.

The store encodes what generators hand it as pixels; a generator that encodes itself (the
mock, in its drawing processes) uses the same functions, so the bytes do not depend on who
encoded them. Nothing of image_server is imported here: the mock's drawing processes load
this module without the service.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

from PIL import Image, PngImagePlugin

JPEG_QUALITY = 92
WEBP_QUALITY = 90
# Formats whose encoding depends on nothing but these constants (PNG also takes the
# service's compress level and text chunks).
LOSSY_FORMATS = frozenset({"jpeg", "webp"})


def encode_lossy(picture: Image.Image, fmt: str) -> bytes:
    """``picture`` as JPEG or WebP bytes."""
    buffer = io.BytesIO()
    if fmt == "jpeg":
        if picture.mode not in ("RGB", "L"):
            picture = picture.convert("RGB")
        picture.save(buffer, "JPEG", quality=JPEG_QUALITY)
    elif fmt == "webp":
        if picture.mode not in ("RGB", "RGBA"):
            picture = picture.convert("RGBA" if "A" in picture.getbands() else "RGB")
        picture.save(buffer, "WEBP", quality=WEBP_QUALITY)
    else:
        raise ValueError(f"not a lossy format: {fmt!r}")
    return buffer.getvalue()


def encode_png(picture: Image.Image, texts: Mapping[str, str], *, compress_level: int) -> bytes:
    """``picture`` as PNG bytes with one iTXt chunk per entry of ``texts``."""
    info = PngImagePlugin.PngInfo()
    for key, text in texts.items():
        info.add_itxt(key, text)
    buffer = io.BytesIO()
    picture.save(buffer, "PNG", compress_level=compress_level, pnginfo=info)
    return buffer.getvalue()
