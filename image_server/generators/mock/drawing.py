"""Deterministic pictures for the mock generator: pure, blocking Pillow functions.

Everything here runs in a worker thread; the same arguments always give the same pixels.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageDraw, ImageFont, ImageOps

Style = Literal["simple", "detailed", "debug"]
STYLES: tuple[Style, ...] = ("simple", "detailed", "debug")
RGB = tuple[int, int, int]
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont | ImageFont.TransposedFont


def derive_seed(request_id: str) -> int:
    """A stable 32-bit seed for a request that did not choose one."""
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:4], "big")


def draw(style: Style, *, width: int, height: int, seed: int, prompt: str, lines: Sequence[str] = ()) -> Image.Image:
    """An RGB picture whose colours and shapes follow from (style, seed, prompt).

    ``simple``: solid colour and the prompt; ``detailed``: gradient, shapes and the prompt;
    ``debug``: ``lines`` (the request's parameters) as a text block.
    """
    rng = random.Random(hashlib.sha256(f"{style}\0{seed}\0{prompt}".encode()).digest())
    background = _colour(rng)
    face = _face(width, height)
    if style == "simple":
        image = Image.new("RGB", (width, height), background)
        _write(image, _wrap(prompt, face, width - 16, height - 16), face, _ink(background), centred=True)
    elif style == "detailed":
        image = _gradient(width, height, background, _colour(rng))
        _shapes(image, rng)
        _write(image, _wrap(prompt, face, width - 16, height // 2), face, (255, 255, 255), centred=True, band=True)
    else:
        dark: RGB = (background[0] // 5, background[1] // 5, background[2] // 5)
        image = Image.new("RGB", (width, height), dark)
        wrapped = [piece for line in lines for piece in _wrap(line, face, width - 16, height)]
        _write(image, _fit_lines(wrapped, face, height - 16), face, (230, 230, 230), centred=False)
    return image


def blend_reference(pattern: Image.Image, reference: Image.Image, strength: float) -> Image.Image:
    """Mix the reference (cropped and resized to the pattern's size) with the pattern.

    ``strength`` follows diffusers: 0 keeps the reference, 1 replaces it with the pattern.
    """
    fitted = ImageOps.fit(reference.convert("RGB"), pattern.size, Image.Resampling.BICUBIC)
    return Image.blend(fitted, pattern.convert("RGB"), strength)


def _colour(rng: random.Random) -> RGB:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _ink(background: RGB) -> RGB:
    """Black or white, whichever reads better on ``background``."""
    red, green, blue = background
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else (255, 255, 255)


def _gradient(width: int, height: int, top: RGB, bottom: RGB) -> Image.Image:
    mask = Image.linear_gradient("L").resize((width, height), Image.Resampling.BILINEAR)
    return Image.composite(Image.new("RGB", (width, height), bottom), Image.new("RGB", (width, height), top), mask)


def _shapes(image: Image.Image, rng: random.Random) -> None:
    width, height = image.size
    canvas = ImageDraw.Draw(image, "RGBA")
    for _ in range(rng.randint(5, 12)):
        fill = (*_colour(rng), rng.randint(90, 200))
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1 = min(width, x0 + rng.randint(width // 10, width // 2 + 1))
        y1 = min(height, y0 + rng.randint(height // 10, height // 2 + 1))
        kind = rng.randrange(3)
        if kind == 0:
            canvas.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind == 1:
            canvas.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            canvas.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fill)


@dataclass(frozen=True)
class _Face:
    """A font of one size with the measures every picture needs, measured once."""

    font: Font
    line_height: int
    space: float


# FreeType faces are not safe to share between threads that render at the same time, so each
# worker thread keeps its own (a handful of sizes); loading one decodes the embedded font.
_faces = threading.local()


def _face(width: int, height: int) -> _Face:
    size = max(8, min(width, height) // 24)
    cache: dict[int, _Face] = _faces.__dict__.setdefault("by_size", {})
    face = cache.get(size)
    if face is None:
        # Pillow's embedded font needs no font files; without FreeType it falls back to a
        # fixed bitmap font and ignores the size.
        font = ImageFont.load_default(size=size)
        face = cache[size] = _Face(font, int(font.getbbox("Ag")[3]) + 4, font.getlength(" "))
    return face


def _printable(text: str, font: Font) -> str:
    # The bitmap fallback font only covers Latin-1.
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _wrap(text: str, face: _Face, max_width: int, max_height: int) -> list[str]:
    """Greedy word wrap, breaking over-long words, stopping once the lines fill ``max_height``.

    Text measuring is most of the drawing time, so the whole text is measured first (a prompt
    usually fits one line) and otherwise each word once, lines adding up their words' widths.
    """
    font = face.font
    words = _printable(text, font).split()
    joined = " ".join(words)
    if not words or font.getlength(joined) <= max_width:
        return [joined] if words else []
    max_lines = max(1, max_height // face.line_height)
    lines: list[str] = []
    current: list[str] = []
    current_width = 0.0
    for word in words:
        word_width = font.getlength(word)
        while word:
            added = word_width + (face.space if current else 0.0)
            if current_width + added <= max_width:
                current.append(word)
                current_width += added
                word = ""
            elif current:
                lines.append(" ".join(current))
                current, current_width = [], 0.0
            else:  # a single word wider than the line: cut it
                cut = max(1, len(word) * max_width // max(1, int(word_width)))
                lines.append(word[:cut])
                word = word[cut:]
                word_width = font.getlength(word) if word else 0.0
            if len(lines) > max_lines:
                return _fit_lines(lines, face, max_height)
    if current:
        lines.append(" ".join(current))
    return _fit_lines(lines, face, max_height)


def _fit_lines(lines: list[str], face: _Face, max_height: int) -> list[str]:
    max_lines = max(1, max_height // face.line_height)
    if len(lines) <= max_lines:
        return lines
    return [*lines[: max_lines - 1], lines[max_lines - 1] + " ..."]


def _write(
    image: Image.Image, lines: Sequence[str], face: _Face, fill: RGB, *, centred: bool, band: bool = False
) -> None:
    width, height = image.size
    font, step = face.font, face.line_height
    top = (height - step * len(lines)) // 2 if centred else 8
    # Opaque text needs no blending layer; only the translucent band does.
    canvas = ImageDraw.Draw(image, "RGBA") if band else ImageDraw.Draw(image)
    if band and lines:
        canvas.rectangle((0, top - 6, width, top + step * len(lines) + 6), fill=(0, 0, 0, 140))
    # FreeType centres a line itself (anchor "ma": middle, ascender); the bitmap fallback
    # font takes no anchor and is measured.
    anchored = centred and isinstance(font, ImageFont.FreeTypeFont)
    for index, line in enumerate(lines):
        y = top + index * step
        if anchored:
            canvas.text((width / 2, y), line, font=font, fill=fill, anchor="ma")
        else:
            left = (width - int(font.getlength(line))) // 2 if centred else 8
            canvas.text((left, y), line, font=font, fill=fill)
