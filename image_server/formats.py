"""Image formats recognised from their first bytes, without decoding (storage and generators share it)."""

from __future__ import annotations


def image_format_of(data: bytes) -> str | None:
    """png / jpeg / webp from magic bytes, without decoding."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None
