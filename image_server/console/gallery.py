"""The archive: every image under the output dir, newest first, a page at a time.

Scanned once off the event loop when the console starts (10,000 files take tens of ms),
then kept current from ``ImageReady`` events, so a page never walks the disk.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path

from image_server.console.files import IMAGE_SUFFIXES


@dataclass(frozen=True, order=True)
class Entry:
    """An image file: when it was written and where, relative to the output dir."""

    mtime: float
    path: str

    def describe(self) -> dict[str, object]:
        """What the path itself says: output/<project>/<generator>/<YYYYMMDD>/<request_id>_<n>.<ext>."""
        parts = self.path.split("/")
        stem = parts[-1].rsplit(".", 1)[0]
        return {
            "path": self.path,
            "mtime": self.mtime,
            "request_id": stem.rsplit("_", 1)[0],
            "generator": parts[-3] if len(parts) >= 3 else None,
            "project": parts[-4] if len(parts) >= 4 else None,
        }


class Gallery:
    """Entries sorted oldest first (so adding the newest is an append)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._entries: list[Entry] = []
        self._known: set[str] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def scan(self) -> None:
        """Walk the output dir (blocking: run in a thread). Symlinks are not followed."""
        found: list[Entry] = []
        for directory, _dirs, files in os.walk(self.root):
            for name in files:
                if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                full = os.path.join(directory, name)
                try:
                    info = os.lstat(full)
                except OSError:
                    continue
                found.append(Entry(info.st_mtime, Path(full).relative_to(self.root).as_posix()))
        found.sort()
        self._entries = found
        self._known = {entry.path for entry in found}

    def add(self, path: str, mtime: float) -> None:
        if path in self._known:
            return
        self._known.add(path)
        bisect.insort(self._entries, Entry(mtime, path))

    def page(self, *, before: Entry | None = None, limit: int = 48) -> list[Entry]:
        """Up to ``limit`` entries older than ``before`` (all of them when None), newest first."""
        end = len(self._entries) if before is None else bisect.bisect_left(self._entries, before)
        start = max(0, end - limit)
        return self._entries[start:end][::-1]
