"""One mock picture, drawn and (for JPEG and WebP) encoded in one call.

A ``Sketch`` is everything the picture depends on, small and picklable, so the same call
runs in a worker thread or in a drawing process (``mock.pool``) with the same bytes out.
Only stdlib, Pillow, ``drawing`` and ``image_server.encoding`` are imported: the drawing
processes load this module without the service.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from image_server.encoding import LOSSY_FORMATS, encode_lossy
from image_server.generators.mock.drawing import Style, draw


@dataclass(frozen=True)
class Sketch:
    style: Style
    width: int
    height: int
    seed: int
    prompt: str
    lines: tuple[str, ...] = ()
    # "jpeg" or "webp": encode in the same call; None: hand back the pixels.
    encode_as: str | None = None


def picture(sketch: Sketch) -> Image.Image:
    """Blocking: the sketch's pixels."""
    return draw(
        sketch.style,
        width=sketch.width,
        height=sketch.height,
        seed=sketch.seed,
        prompt=sketch.prompt,
        lines=sketch.lines,
    )


def encoded(sketch: Sketch) -> bytes:
    """Blocking: the sketch drawn and encoded as ``sketch.encode_as`` (a lossy format)."""
    if sketch.encode_as not in LOSSY_FORMATS:
        raise ValueError(f"a sketch to encode needs a lossy format, not {sketch.encode_as!r}")
    return encode_lossy(picture(sketch), sketch.encode_as)
