"""pngtext.insert_text: valid PNGs that Pillow verifies and reads, Unicode text, bad input."""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from image_server.pngtext import PNG_SIGNATURE, insert_text


def png_bytes(mode: str = "RGB", size: tuple[int, int] = (40, 30), **save: object) -> bytes:
    image = Image.linear_gradient("L").resize(size).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **save)
    return buffer.getvalue()


def chunks(png: bytes) -> list[tuple[bytes, bytes, int]]:
    """(type, data, stored CRC) of every chunk, read independently of Pillow."""
    assert png.startswith(PNG_SIGNATURE)
    found, offset = [], len(PNG_SIGNATURE)
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        kind = png[offset + 4 : offset + 8]
        data = png[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", png[offset + 8 + length : offset + 12 + length])
        found.append((kind, data, crc))
        offset += 12 + length
    assert offset == len(png)
    return found


def opened(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def test_inserted_text_is_read_by_pillow_and_verifies() -> None:
    original = png_bytes()
    parameters = json.dumps({"seed": 7, "steps": 20, "generator": "mock"})
    marked = insert_text(original, {"parameters": parameters, "prompt": "a fox"})
    with Image.open(io.BytesIO(marked)) as image:
        image.verify()  # walks every chunk and checks its CRC
    image = opened(marked)
    assert image.text == {"parameters": parameters, "prompt": "a fox"}
    assert json.loads(image.text["parameters"])["seed"] == 7
    assert image.tobytes() == opened(original).tobytes()


def test_text_goes_right_after_ihdr_and_the_rest_is_untouched() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "elsewhere")
    original = png_bytes("RGBA", pnginfo=info)
    marked = insert_text(original, {"a": "1", "b": "2"})
    before, after = chunks(original), chunks(marked)
    assert after[0] == before[0] and after[0][0] == b"IHDR"
    assert [kind for kind, _, _ in after[1:3]] == [b"iTXt", b"iTXt"]
    assert after[3:] == before[1:]  # every original chunk, byte for byte, in order
    assert marked[: len(PNG_SIGNATURE)] == PNG_SIGNATURE


def test_every_crc_is_right() -> None:
    marked = insert_text(png_bytes(), {"prompt": "check me", "parameters": "{}"})
    for kind, data, crc in chunks(marked):
        assert zlib.crc32(kind + data) & 0xFFFFFFFF == crc, kind


def test_a_broken_crc_is_noticed_by_pillow() -> None:
    # The control for the tests above: Pillow really checks the CRCs we rely on.
    marked = bytearray(insert_text(png_bytes(), {"prompt": "tamper with me"}))
    position = bytes(marked).index(b"tamper")
    marked[position] ^= 0x20  # "Tamper": still valid UTF-8, only the CRC is now wrong
    # Pillow reads text chunks while opening; a CRC error there surfaces as "cannot identify".
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(bytes(marked)))


@pytest.mark.parametrize(
    "prompt",
    ["東京の夜景、雨上がり", "café crème ☕ — naïve façade", "emoji 🦊🌨️ and\nnew lines\tand tabs", "x" * 20_000],
)
def test_non_ascii_and_long_text_round_trips(prompt: str) -> None:
    marked = insert_text(png_bytes(), {"prompt": prompt, "parameters": json.dumps({"prompt": prompt})})
    image = opened(marked)
    assert image.text["prompt"] == prompt
    assert json.loads(image.text["parameters"]) == {"prompt": prompt}


def test_no_texts_leaves_the_stream_unchanged() -> None:
    original = png_bytes()
    assert insert_text(original, {}) == original


def test_keys_longer_than_png_allows_are_cut_to_79_bytes() -> None:
    image = opened(insert_text(png_bytes(), {"k" * 100: "value"}))
    assert image.text == {"k" * 79: "value"}


def test_works_on_palette_and_grey_images() -> None:
    for mode in ("P", "L", "1"):
        original = png_bytes(mode)
        image = opened(insert_text(original, {"prompt": mode}))
        assert image.text["prompt"] == mode and image.mode == opened(original).mode
        assert image.tobytes() == opened(original).tobytes()


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    return buffer.getvalue()


GOOD = png_bytes()


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"hello, world", id="text"),
        pytest.param(_jpeg(), id="jpeg"),
        pytest.param(PNG_SIGNATURE, id="signature-only"),
        pytest.param(GOOD[:20], id="truncated-ihdr"),
        pytest.param(GOOD[:8] + GOOD[33:], id="no-ihdr"),
        pytest.param(GOOD[:8] + struct.pack(">I", 12) + GOOD[12:], id="wrong-ihdr-length"),
        pytest.param(GOOD[:20] + bytes([GOOD[20] ^ 1]) + GOOD[21:], id="ihdr-crc-mismatch"),
        pytest.param(b"\x89PNG\r\n\x1b\n" + GOOD[8:], id="bad-signature"),
    ],
)
def test_garbage_raises_value_error(garbage: bytes) -> None:
    with pytest.raises(ValueError, match="not a PNG"):
        insert_text(garbage, {"prompt": "p"})


def test_a_key_outside_latin1_is_refused() -> None:
    # PNG keywords are Latin-1 only; the text itself may be any Unicode (iTXt is UTF-8).
    with pytest.raises(ValueError):
        insert_text(GOOD, {"ключ": "value"})
