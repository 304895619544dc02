"""Which request ids the journal may know, answered on the event loop without asking SQLite.

A Bloom filter over every id the journal holds: "surely new" lets a request start rendering
while its row is being written (``lifecycle``), "maybe known" (a repeat, or a rare false
positive) waits for the journal's answer as before. It has no false negatives: an id is
added when its row is queued for writing, before the row exists, and a rebuild (when the
filter fills up, or at start) is fed from the database while new ids go into both filters.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable

MIN_CAPACITY = 1 << 16
FALSE_POSITIVE_RATE = 0.01
_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15


class IdFilter:
    """A Bloom filter sized for ``capacity`` ids at ``error_rate`` false positives."""

    def __init__(self, capacity: int, error_rate: float = FALSE_POSITIVE_RATE) -> None:
        self.capacity = max(1, capacity)
        self.bits = max(64, math.ceil(-self.capacity * math.log(error_rate) / math.log(2) ** 2))
        self.hashes = max(1, round(self.bits / self.capacity * math.log(2)))
        self.count = 0
        self._array = bytearray((self.bits + 7) // 8)

    def _positions(self, request_id: str) -> list[int]:
        # str's hash is salted per process; this filter lives in memory only, so that is fine
        # and it is far cheaper than a cryptographic hash. Double hashing gives the k positions.
        first = hash(request_id) & _MASK64
        step = ((first * _GOLDEN64) & _MASK64) >> 32 | 1
        return [(first + i * step) % self.bits for i in range(self.hashes)]

    def add(self, request_id: str) -> None:
        array = self._array
        for position in self._positions(request_id):
            array[position >> 3] |= 1 << (position & 7)
        self.count += 1

    def __contains__(self, request_id: object) -> bool:
        if not isinstance(request_id, str):
            return False
        array = self._array
        return all(array[position >> 3] & (1 << (position & 7)) for position in self._positions(request_id))

    @property
    def full(self) -> bool:
        return self.count > self.capacity


class KnownIds:
    """The journal's ids: ``add`` on the loop as rows are queued, ``may_know`` on the loop;
    ``fill`` on a worker thread during a (re)build."""

    def __init__(self) -> None:
        self._current = IdFilter(MIN_CAPACITY)
        self._next: IdFilter | None = None
        self._lock = threading.Lock()  # the loop adds while the writer thread fills a rebuild
        self.loaded = False  # until the first build from the database, every id "may be known"
        self.rebuilds = 0

    def add(self, request_id: str) -> None:
        with self._lock:
            self._current.add(request_id)
            if self._next is not None:
                self._next.add(request_id)

    def may_know(self, request_id: str) -> bool:
        return not self.loaded or request_id in self._current

    @property
    def needs_rebuild(self) -> bool:
        return self._next is None and (not self.loaded or self._current.full)

    def start_rebuild(self, expected: int = 0) -> IdFilter:
        """Begin a new filter for about ``expected`` ids; from now on ``add`` feeds it too.
        The caller then fills it with every id whose row was queued before this call."""
        with self._lock:
            self._next = IdFilter(max(MIN_CAPACITY, 2 * max(expected, self._current.count)))
            return self._next

    def fill(self, target: IdFilter, request_ids: Iterable[str], *, chunk: int = 256) -> None:
        """Worker thread: add the database's ids to ``target``, then make it current. Small
        chunks: the loop's ``add`` waits for the lock while one is added."""
        batch: list[str] = []
        for request_id in request_ids:
            batch.append(request_id)
            if len(batch) >= chunk:
                self._add_to(target, batch)
                batch = []
        self._add_to(target, batch)
        with self._lock:
            if self._next is target:
                self._current, self._next = target, None
                self.loaded = True
                self.rebuilds += 1

    def abandon(self, target: IdFilter) -> None:
        """A rebuild failed: keep the current filter (a full one only errs towards "maybe")."""
        with self._lock:
            if self._next is target:
                self._next = None

    def _add_to(self, target: IdFilter, request_ids: list[str]) -> None:
        with self._lock:
            for request_id in request_ids:
                target.add(request_id)

    def __repr__(self) -> str:
        current = self._current
        return f"<KnownIds {current.count}/{current.capacity} loaded={self.loaded} rebuilds={self.rebuilds}>"
