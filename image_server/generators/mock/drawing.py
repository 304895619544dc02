"""Deterministic pictures for the mock generator: pure, blocking Pillow functions.

Everything here runs in a worker thread; the same arguments always give the same pixels.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
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
    font = _font(width, height)
    if style == "simple":
        image = Image.new("RGB", (width, height), background)
        _write(image, _wrap(prompt, font, width - 16, height - 16), font, _ink(background), centred=True)
    elif style == "detailed":
        image = _gradient(width, height, background, _colour(rng))
        _shapes(image, rng)
        _write(image, _wrap(prompt, font, width - 16, height // 2), font, (255, 255, 255), centred=True, band=True)
    else:
        dark: RGB = (background[0] // 5, background[1] // 5, background[2] // 5)
        image = Image.new("RGB", (width, height), dark)
        wrapped = [piece for line in lines for piece in _wrap(line, font, width - 16, height)]
        _write(image, _fit_lines(wrapped, font, height - 16), font, (230, 230, 230), centred=False)
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


def _font(width: int, height: int) -> Font:
    # Pillow's embedded font needs no font files; without FreeType it falls back to a fixed
    # bitmap font and ignores the size.
    return ImageFont.load_default(size=max(8, min(width, height) // 24))


def _printable(text: str, font: Font) -> str:
    # The bitmap fallback font only covers Latin-1.
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _line_height(font: Font) -> int:
    return int(font.getbbox("Ag")[3]) + 4


def _wrap(text: str, font: Font, max_width: int, max_height: int) -> list[str]:
    """Greedy word wrap, breaking over-long words, stopping once the lines fill ``max_height``."""
    max_lines = max(1, max_height // _line_height(font))
    lines: list[str] = []
    current = ""
    for word in _printable(text, font).split():
        while word:
            candidate = f"{current} {word}" if current else word
            if font.getlength(candidate) <= max_width:
                current, word = candidate, ""
            elif current:
                lines.append(current)
                current = ""
            else:  # a single word wider than the line: cut it
                cut = max(1, len(word) * max_width // max(1, int(font.getlength(word))))
                lines.append(word[:cut])
                word = word[cut:]
            if len(lines) > max_lines:
                return _fit_lines(lines, font, max_height)
    if current:
        lines.append(current)
    return _fit_lines(lines, font, max_height)


def _fit_lines(lines: list[str], font: Font, max_height: int) -> list[str]:
    max_lines = max(1, max_height // _line_height(font))
    if len(lines) <= max_lines:
        return lines
    return [*lines[: max_lines - 1], lines[max_lines - 1] + " ..."]


def _write(
    image: Image.Image, lines: Sequence[str], font: Font, fill: RGB, *, centred: bool, band: bool = False
) -> None:
    width, height = image.size
    step = _line_height(font)
    top = (height - step * len(lines)) // 2 if centred else 8
    canvas = ImageDraw.Draw(image, "RGBA")
    if band and lines:
        canvas.rectangle((0, top - 6, width, top + step * len(lines) + 6), fill=(0, 0, 0, 140))
    for index, line in enumerate(lines):
        left = (width - int(font.getlength(line))) // 2 if centred else 8
        canvas.text((left, top + index * step), line, font=font, fill=fill)
