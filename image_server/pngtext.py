"""Insert text chunks into an encoded PNG without re-encoding its pixels."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def itxt_chunk(key: str, text: str) -> bytes:
    """An uncompressed iTXt chunk (UTF-8, so prompts in any language survive)."""
    data = key.encode("latin-1")[:79] + b"\x00" + b"\x00\x00" + b"\x00" + b"\x00" + text.encode("utf-8")
    return _chunk(b"iTXt", data)


def insert_text(png: bytes, texts: Mapping[str, str]) -> bytes:
    """``png`` with one iTXt chunk per entry, placed right after IHDR.

    Raises ValueError if ``png`` does not start with a well-formed IHDR chunk.
    """
    if not png.startswith(PNG_SIGNATURE) or png[12:16] != b"IHDR":
        raise ValueError("not a PNG stream")
    # IHDR is always 13 bytes. Checking its length and CRC refuses a truncated or corrupt
    # header here, instead of returning bytes with text added that no decoder can open.
    ihdr_end = 8 + 8 + 13 + 4
    if struct.unpack(">I", png[8:12])[0] != 13 or len(png) < ihdr_end:
        raise ValueError("not a PNG stream: truncated or malformed IHDR chunk")
    if zlib.crc32(png[12 : ihdr_end - 4]) & 0xFFFFFFFF != struct.unpack(">I", png[ihdr_end - 4 : ihdr_end])[0]:
        raise ValueError("not a PNG stream: IHDR checksum mismatch")
    chunks = b"".join(itxt_chunk(key, text) for key, text in texts.items())
    return png[:ihdr_end] + chunks + png[ihdr_end:]
