"""Bytes from the base64 a request carries inline (``image_data`` or a ``data:`` URI), in
steps short enough that the event loop's thread is never kept from the GIL for long.

Base64 decoding holds the GIL for as long as it runs (about 1 ms per MB), and so does
removing line breaks from a wrapped payload; a 4 MB reference decoded in one call kept the
loop waiting ~10 ms (benchmarks/README.md, figure 5). Here both are done 64 KB at a time:
one strict ``a2b_base64`` call then holds the GIL for at most ~0.1 ms (0.6 ms at 512 KB),
for the same total time.
``head`` decodes only the start, which is where an image's header is: enough to check its
format and size before the request is journaled, without decoding all of it twice.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterator

from image_server.errors import ReferenceImageError

__all__ = ["decode_base64_source", "decode_base64_head"]

CHUNK_CHARS = 64 * 1024  # a multiple of 4
_WHITESPACE = " \n\r\t"


def _payload(text: str, max_bytes: int) -> str:
    """The base64 part of ``text`` (raw, or after a ``data:...;base64,`` header), refused
    at once when even its length says it is over ``max_bytes``."""
    payload = text
    if text[:5].lower() == "data:":
        header, comma, payload = text.partition(",")
        if not comma:
            raise ReferenceImageError("malformed data URI (no ',' before the data)")
        if "base64" not in (part.strip().lower() for part in header[5:].split(";")[1:]):
            raise ReferenceImageError("only base64 data URIs are supported")
    if len(payload) > _encoded_limit(max_bytes) + len(payload) // 64 + 1024:  # generous for line breaks
        raise _too_big(max_bytes)
    return payload


def _encoded_limit(max_bytes: int) -> int:
    return 4 * -(-max_bytes // 3)


def _too_big(max_bytes: int) -> ReferenceImageError:
    return ReferenceImageError(f"image data is larger than the limit of {max_bytes} bytes")


def _spaced(payload: str) -> bool:
    """Whether ``payload`` holds whitespace (a full scan per character, GIL held: once per
    payload)."""
    return any(c in payload for c in _WHITESPACE)


def _decoded_size(payload: str, spaced: bool) -> int:
    """How many bytes ``payload`` decodes to, counted without decoding or copying it."""
    characters = len(payload)
    if spaced:
        characters -= sum(payload.count(c) for c in _WHITESPACE)
    tail = payload[-64:].rstrip(_WHITESPACE)
    padding = len(tail) - len(tail.rstrip("="))
    return (characters - padding) * 3 // 4


def _compact_pieces(payload: str, spaced: bool) -> Iterator[str]:
    """``payload`` without whitespace, a slice at a time, each a multiple of 4 characters
    long except the last (which gets the padding a sender may have left off)."""
    carry = ""
    for start in range(0, len(payload), CHUNK_CHARS):
        piece = payload[start : start + CHUNK_CHARS]
        if spaced:
            piece = "".join(piece.split())
        piece = carry + piece if carry else piece
        cut = len(piece) - len(piece) % 4
        carry = piece[cut:]
        if cut:
            yield piece[:cut]
    if carry:
        yield carry + "=" * (-len(carry) % 4)


def _decode(piece: str) -> bytes:
    # binascii reads an ASCII str in place; base64.b64decode would first copy it to bytes.
    try:
        return binascii.a2b_base64(piece, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise ReferenceImageError("image data is not valid base64") from exc


def decode_base64_source(text: str, max_bytes: int) -> bytes:
    """Bytes from raw base64 or a ``data:...;base64,`` URI; whitespace is ignored.

    The size cap is checked on the base64 length before anything is decoded.
    """
    payload = _payload(text, max_bytes)
    limit = _encoded_limit(max_bytes)
    parts: list[bytes] = []
    seen = 0
    for piece in _compact_pieces(payload, _spaced(payload)):
        seen += len(piece)
        if seen > limit:
            raise _too_big(max_bytes)
        parts.append(_decode(piece))
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    if not data:
        raise ReferenceImageError("image data is empty")
    if len(data) > max_bytes:
        raise _too_big(max_bytes)
    return data


def decode_base64_head(text: str, max_bytes: int, head_bytes: int) -> tuple[bytes, bool]:
    """(about the first ``head_bytes`` of the data, whether that is all of it).

    The same checks as ``decode_base64_source`` on what is decoded; the rest is left for
    the full decode (a bad character further on is found then).
    """
    payload = _payload(text, max_bytes)
    spaced = _spaced(payload)
    if _decoded_size(payload, spaced) > max_bytes:
        raise _too_big(max_bytes)
    parts: list[bytes] = []
    decoded = 0
    pieces = _compact_pieces(payload, spaced)
    for piece in pieces:
        parts.append(_decode(piece))
        decoded += len(parts[-1])
        if decoded >= head_bytes:
            break
    complete = next(pieces, None) is None
    data = b"".join(parts)
    if not data:
        raise ReferenceImageError("image data is empty")
    if complete and len(data) > max_bytes:
        raise _too_big(max_bytes)
    return data, complete
