"""Thumbnails: made once per image in a worker thread, cached on disk, shared by concurrent asks."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from pathlib import Path

from PIL import Image

from image_server.console.files import NotServed, read_image, split_relative
from image_server.storage import write_atomic

THUMB_SIDE = 320


def make_thumbnail(data: bytes, side: int = THUMB_SIDE) -> bytes:
    """A JPEG no larger than ``side`` on either axis (blocking)."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (side, side))  # JPEG decodes at a reduced scale: several times faster
        image.thumbnail((side, side))
        out = io.BytesIO()
        image.convert("RGB").save(out, "JPEG", quality=80)
    return out.getvalue()


class Thumbnails:
    """``get(relative)`` returns JPEG bytes, making them on first ask and caching them in ``cache_dir``."""

    def __init__(self, output_dir: Path, cache_dir: Path) -> None:
        self.output_dir = output_dir
        self.cache_dir = cache_dir
        self._making: dict[str, asyncio.Future[bytes]] = {}

    async def get(self, relative: str) -> bytes:
        key = hashlib.sha256(relative.encode()).hexdigest()
        if key in self._making:  # someone asked a moment ago: share their work
            return await asyncio.shield(self._making[key])
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._making[key] = future
        try:
            data = await asyncio.to_thread(self._load_or_make, relative, key)
            future.set_result(data)
            return data
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            del self._making[key]

    def _load_or_make(self, relative: str, key: str) -> bytes:
        # The cache name covers size and mtime: a file rewritten in place gets a new thumbnail.
        try:
            info = os.lstat(self.output_dir / "/".join(split_relative(relative)))
        except OSError as exc:
            raise NotServed(relative) from exc
        cached = self.cache_dir / key[:2] / f"{key[2:26]}-{info.st_mtime_ns:x}-{info.st_size:x}.jpg"
        try:
            return cached.read_bytes()
        except FileNotFoundError:
            pass
        original, _ = read_image(self.output_dir, relative)  # the guarded read: no symlinks, no FIFOs
        thumb = make_thumbnail(original)
        os.makedirs(cached.parent, mode=0o700, exist_ok=True)
        write_atomic(cached, thumb)
        return thumb
