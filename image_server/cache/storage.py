"""Where cached results live: the ``CacheStorage`` interface and its local-disk implementation.

Each entry is a folder ``<root>/<key[:2]>/<key>/`` with ``meta.json`` and one file per
image. It is written under a temporary name and renamed into place, so a crash leaves a
whole entry or none, and a restart finds every entry it finished. Entries older than
``max_age_s`` are misses (and removed); past ``max_bytes`` the least recently used go.
Recently used entries are also kept in memory (``memory_bytes``), so a hot hit reads no file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from image_server.cache.entry import CachedResult

logger = logging.getLogger(__name__)


class CacheStorage(Protocol):
    """A shared result cache. ``get`` returns None on a miss (absent, expired, unreadable)."""

    async def open(self) -> None: ...

    async def get(self, key: str) -> CachedResult | None: ...

    async def put(self, key: str, result: CachedResult) -> None: ...

    def stats(self) -> dict[str, int]: ...


@dataclass
class _Indexed:
    size: int
    created_at: float


class DiskCacheStorage:
    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int,
        max_age_s: float,
        memory_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.memory_bytes = memory_bytes
        self.clock = clock
        self._index: OrderedDict[str, _Indexed] = OrderedDict()  # least recently used first
        self._memory: OrderedDict[str, CachedResult] = OrderedDict()
        self._memory_size = 0
        self._lock = asyncio.Lock()  # writes and evictions, one at a time

    def _folder(self, key: str) -> Path:
        return self.root / key[:2] / key

    async def open(self) -> None:
        self._index = await asyncio.to_thread(self._scan)

    def _scan(self) -> OrderedDict[str, _Indexed]:
        """Index what a previous run left; drop half-written entries (temporary folders)."""
        found: list[tuple[float, str, _Indexed]] = []
        self.root.mkdir(parents=True, exist_ok=True)
        for shard in self.root.iterdir():
            if not shard.is_dir():
                continue
            for folder in shard.iterdir():
                if folder.name.startswith("."):
                    shutil.rmtree(folder, ignore_errors=True)
                    continue
                try:
                    meta = json.loads((folder / "meta.json").read_text())
                    size = sum(f.stat().st_size for f in folder.iterdir())
                    used = (folder / "meta.json").stat().st_atime
                except (OSError, ValueError):
                    shutil.rmtree(folder, ignore_errors=True)
                    continue
                found.append((used, folder.name, _Indexed(size, float(meta.get("created_at") or 0.0))))
        return OrderedDict((key, entry) for _, key, entry in sorted(found))

    def stats(self) -> dict[str, int]:
        return {
            "cache_entries": len(self._index),
            "cache_bytes": sum(entry.size for entry in self._index.values()),
        }

    # -- reading ----------------------------------------------------------------------

    async def get(self, key: str) -> CachedResult | None:
        indexed = self._index.get(key)
        if indexed is None:
            return None
        if self.clock() - indexed.created_at > self.max_age_s:
            async with self._lock:
                await self._remove(key)
            return None
        self._index.move_to_end(key)
        hot = self._memory.get(key)
        if hot is not None:
            self._memory.move_to_end(key)
            return hot
        try:
            result = await asyncio.to_thread(self._read, key)
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning("cache entry %s is unreadable; dropping it", key)
            async with self._lock:
                await self._remove(key)
            return None
        self._remember(key, result)
        return result

    def _read(self, key: str) -> CachedResult:
        folder = self._folder(key)
        meta = json.loads((folder / "meta.json").read_text())
        blobs = [(folder / f"{index}.{info['format']}").read_bytes() for index, info in enumerate(meta["images"])]
        return CachedResult.from_meta(meta, blobs)

    def _remember(self, key: str, result: CachedResult) -> None:
        if result.size > self.memory_bytes:
            return
        self._memory[key] = result
        self._memory_size += result.size
        while self._memory_size > self.memory_bytes:
            _, dropped = self._memory.popitem(last=False)
            self._memory_size -= dropped.size

    # -- writing ----------------------------------------------------------------------

    async def put(self, key: str, result: CachedResult) -> None:
        if result.size > self.max_bytes:
            return
        async with self._lock:
            if key in self._index:
                return
            await asyncio.to_thread(self._write, key, result)
            self._index[key] = _Indexed(result.size, result.created_at)
            self._remember(key, result)
            while sum(entry.size for entry in self._index.values()) > self.max_bytes:
                await self._remove(next(iter(self._index)))

    def _write(self, key: str, result: CachedResult) -> None:
        final = self._folder(key)
        temp = final.with_name(f".{key}.{secrets.token_hex(6)}")
        temp.mkdir(parents=True)
        try:
            for index, image in enumerate(result.images):
                _write_synced(temp / f"{index}.{image.format}", image.data)
            _write_synced(temp / "meta.json", json.dumps(result.meta()).encode())
            if final.exists():  # another process sharing the folder stored it first: same content
                shutil.rmtree(temp, ignore_errors=True)
                return
            os.replace(temp, final)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise

    async def _remove(self, key: str) -> None:
        self._index.pop(key, None)
        hot = self._memory.pop(key, None)
        if hot is not None:
            self._memory_size -= hot.size
        await asyncio.to_thread(shutil.rmtree, self._folder(key), True)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
