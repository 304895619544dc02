"""The journal: every accepted request and its terminal event, in SQLite (WAL).

All SQLite work runs on one writer thread. Operations queued while it is busy are
committed together (group commit), so a burst of requests costs one fsync-free WAL commit
per batch, and the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
JOURNAL_FILE = "journal.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id   TEXT PRIMARY KEY,
    generator    TEXT NOT NULL,
    request_json TEXT NOT NULL,
    accepted_at  REAL NOT NULL,
    finished_at  REAL,
    outcome      TEXT,            -- ImageReady | RenderError | NULL while unfinished
    code         TEXT,
    terminal     TEXT,            -- the terminal event as published (JSON)
    total_ms     REAL,
    owner        TEXT             -- who sent it: CURVE key or reply_to (see identity.py)
);
CREATE INDEX IF NOT EXISTS requests_unfinished ON requests(accepted_at) WHERE finished_at IS NULL;
CREATE INDEX IF NOT EXISTS requests_finished ON requests(finished_at);
CREATE TABLE IF NOT EXISTS request_frames (   -- images a request sent as extra frames
    request_id TEXT NOT NULL,
    idx        INTEGER NOT NULL,
    data       BLOB NOT NULL,
    PRIMARY KEY (request_id, idx)
);
CREATE TABLE IF NOT EXISTS blobs (
    request_id TEXT NOT NULL,
    idx        INTEGER NOT NULL,
    data       BLOB NOT NULL,
    PRIMARY KEY (request_id, idx)
);
"""


class Recording(Enum):
    NEW = "new"  # recorded now: render it
    IN_FLIGHT = "in_flight"  # recorded earlier, no terminal event yet
    FINISHED = "finished"  # has a terminal event: re-publish it


@dataclass(frozen=True)
class JournalEntry:
    request_id: str
    generator: str
    request_json: str | bytes | bytearray  # the request as received (JSON text, stored as a BLOB)
    accepted_at: float
    finished_at: float | None = None
    outcome: str | None = None
    code: str | None = None
    terminal: str | bytes | None = None
    total_ms: float | None = None
    owner: str | None = None


@dataclass(frozen=True)
class Recorded:
    state: Recording
    entry: JournalEntry
    blobs: list[bytes]


class QuotaExceeded(Exception):
    """The journal holds ``used`` bytes; recording ``needed`` more would pass ``quota``."""

    def __init__(self, used: int, needed: int, quota: int) -> None:
        super().__init__(f"the journal holds {used} bytes; its quota is {quota} bytes (journal.max_bytes)")
        self.used, self.needed, self.quota = used, needed, quota


_Op = tuple[Callable[[sqlite3.Connection], Any], Future[Any]]


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    else:
        _create_private(path)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (SIGKILL); only power loss can cost the
        # last commits, which the client library's re-sends cover.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(_SCHEMA)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
        if "owner" not in columns:  # a journal written before requests had owners
            conn.execute("ALTER TABLE requests ADD COLUMN owner TEXT")
    conn.row_factory = sqlite3.Row
    return conn


def _create_private(path: Path) -> None:
    """The journal holds prompts, images and metadata: its folder 0700, the file 0600. SQLite
    gives its -wal and -shm files the database file's mode."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)  # mkdir's mode is masked by the umask, and the folder may be old
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes the journal's live pages take (freed pages are reused before the file grows)."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int(pages * conn.execute("PRAGMA page_size").fetchone()[0])


class Journal:
    """``async with Journal(state_dir) as journal:``; every method is a coroutine run on
    the writer thread, in submission order."""

    def __init__(
        self,
        state_dir: Path,
        *,
        retention_s: float = 7 * 24 * 3600,
        failed_body_retention_s: float = 3600,
        max_bytes: int | None = None,
    ) -> None:
        self.path = Path(state_dir) / JOURNAL_FILE
        self.retention_s = retention_s
        self.failed_body_retention_s = failed_body_retention_s
        self.max_bytes = max_bytes
        self.used_bytes = 0  # as of the last operation that measured it
        self._ops: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.commits = 0

    async def __aenter__(self) -> Journal:
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._writer, args=(ready,), name="journal", daemon=True)
        self._thread.start()
        await asyncio.wrap_future(ready)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._thread is None:
            return
        self._ops.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def _writer(self, ready: Future[None]) -> None:
        try:
            conn = connect(self.path)
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            while True:
                op = self._ops.get()
                batch: list[_Op] = []
                stop = op is None
                if op is not None:
                    batch.append(op)
                while not stop:
                    try:
                        more = self._ops.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                    else:
                        batch.append(more)
                if batch:
                    self._run_batch(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        results: list[tuple[Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            # Another process held the write lock past busy_timeout (or the disk failed):
            # fail this batch, keep the writer alive for the next one.
            logger.error("journal: cannot start a transaction: %s", exc)
            for _, future in batch:
                if future.set_running_or_notify_cancel():
                    future.set_exception(exc)
            return
        for fn, future in batch:
            if not future.set_running_or_notify_cancel():
                continue  # its caller was cancelled before the op ran: skip it
            conn.execute("SAVEPOINT op")
            try:
                results.append((future, fn(conn), None))
                conn.execute("RELEASE op")
            except Exception as exc:
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                results.append((future, None, exc))
        try:
            conn.execute("COMMIT")
            self.commits += 1
        except Exception as exc:
            logger.exception("journal commit failed")
            results = [(future, None, exc) for future, _, _ in results]
        for future, value, error in results:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._thread is None:
            raise RuntimeError("the journal is not open")
        future: Future[T] = Future()
        self._ops.put((fn, future))
        return await asyncio.wrap_future(future)

    # -- operations -------------------------------------------------------------------

    async def admit(
        self,
        request_id: str,
        generator: str,
        request_json: str | bytes | bytearray,
        frames: Sequence[bytes | bytearray] = (),
        *,
        owner: str | None = None,
    ) -> Recorded:
        """Record a new request (with the image frames it sent, needed to resume it), or say
        what the journal already knows about it. Raises ``QuotaExceeded`` instead of growing
        past ``max_bytes``."""
        size = len(request_json) + sum(len(frame) for frame in frames)

        def op(conn: sqlite3.Connection) -> Recorded:
            row = conn.execute("SELECT * FROM requests WHERE request_id = ?", (request_id,)).fetchone()
            if row is None:
                self._check_quota(conn, size)
                now = time.time()
                _insert_request(conn, request_id, generator, request_json, now, owner)
                conn.executemany(
                    "INSERT OR REPLACE INTO request_frames (request_id, idx, data) VALUES (?, ?, ?)",
                    [(request_id, index, frame) for index, frame in enumerate(frames)],
                )
                entry = JournalEntry(request_id, generator, request_json, now, owner=owner)
                return Recorded(Recording.NEW, entry, [])
            return _known(conn, row)

        return await self._call(op)

    def _check_quota(self, conn: sqlite3.Connection, needed: int) -> None:
        self.used_bytes = used_bytes(conn)
        if self.max_bytes is not None and self.used_bytes + needed > self.max_bytes:
            raise QuotaExceeded(self.used_bytes, needed, self.max_bytes)

    async def finish(
        self,
        request_id: str,
        outcome: str,
        code: str | None,
        terminal_json: str | bytes,
        blobs: Sequence[bytes] = (),
        total_ms: float | None = None,
        *,
        generator: str = "",
        owner: str | None = None,
    ) -> Recorded:
        """Record the terminal event (before it is published). The first one recorded stays:
        state ``NEW`` means this one was stored; otherwise the entry holds the one that was.

        A request that was never admitted (refused at the door, ended before it was
        journaled) gets a row of its own, without a body, so its id has one terminal event.
        A finished request keeps no reference bytes: its frames go, and so does its body,
        at once after ``ImageReady`` (the event echoes ``metadata``), after
        ``failed_body_retention_s`` otherwise.
        """

        def op(conn: sqlite3.Connection) -> Recorded:
            now = time.time()
            body_kept = outcome != "ImageReady" and self.failed_body_retention_s > 0
            updated = conn.execute(
                "UPDATE requests SET finished_at = ?, outcome = ?, code = ?, terminal = ?, total_ms = ?"
                + ("" if body_kept else ", request_json = x''")
                + " WHERE request_id = ? AND finished_at IS NULL",  # the first terminal event stays
                (now, outcome, code, terminal_json, total_ms, request_id),
            )
            if updated.rowcount == 0:
                row = conn.execute("SELECT * FROM requests WHERE request_id = ?", (request_id,)).fetchone()
                if row is not None:
                    return _known(conn, row)  # already finished: the stored event stands
                self._check_quota(conn, len(terminal_json) + sum(len(blob) for blob in blobs))
                conn.execute(
                    "INSERT INTO requests (request_id, generator, request_json, accepted_at, finished_at, outcome, "
                    "code, terminal, total_ms, owner) VALUES (?, ?, x'', ?, ?, ?, ?, ?, ?, ?)",
                    (request_id, generator, now, now, outcome, code, terminal_json, total_ms, owner),
                )
            conn.execute("DELETE FROM request_frames WHERE request_id = ?", (request_id,))
            conn.executemany(
                "INSERT OR REPLACE INTO blobs (request_id, idx, data) VALUES (?, ?, ?)",
                [(request_id, i, blob) for i, blob in enumerate(blobs)],
            )
            entry = JournalEntry(request_id, generator, b"", now, now, outcome, code, terminal_json, total_ms, owner)
            return Recorded(Recording.NEW, entry, list(blobs))

        return await self._call(op)

    async def lookup(self, request_id: str) -> Recorded | None:
        """What the journal knows about ``request_id`` (``None``: nothing)."""

        def op(conn: sqlite3.Connection) -> Recorded | None:
            row = conn.execute("SELECT * FROM requests WHERE request_id = ?", (request_id,)).fetchone()
            return None if row is None else _known(conn, row)

        return await self._call(op)

    async def size(self) -> int:
        """Bytes the journal's live pages take (for ServiceStatus and the quota)."""

        def op(conn: sqlite3.Connection) -> int:
            self.used_bytes = used_bytes(conn)
            return self.used_bytes

        return await self._call(op)

    async def request_frames(self, request_id: str) -> list[bytes]:
        """The image frames an unfinished request arrived with, in order."""

        def op(conn: sqlite3.Connection) -> list[bytes]:
            rows = conn.execute("SELECT data FROM request_frames WHERE request_id = ? ORDER BY idx", (request_id,))
            return [bytes(row["data"]) for row in rows]

        return await self._call(op)

    async def unfinished(self) -> list[JournalEntry]:
        """Accepted requests without a terminal record, oldest first."""

        def op(conn: sqlite3.Connection) -> list[JournalEntry]:
            rows = conn.execute("SELECT * FROM requests WHERE finished_at IS NULL ORDER BY accepted_at").fetchall()
            return [JournalEntry(**dict(row)) for row in rows]

        return await self._call(op)

    async def stats(self) -> tuple[int, int]:
        """(rows, unfinished rows), for metrics."""

        def op(conn: sqlite3.Connection) -> tuple[int, int]:
            rows, unfinished = conn.execute("SELECT COUNT(*), COUNT(*) - COUNT(finished_at) FROM requests").fetchone()
            return int(rows), int(unfinished)

        return await self._call(op)

    def size_bytes(self) -> int:
        """The database file and its WAL, in bytes."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += self.path.with_name(self.path.name + suffix).stat().st_size
            except FileNotFoundError:
                pass
        return total

    async def prune(self, *, now: float | None = None) -> int:
        """Delete finished entries older than the retention, and the bodies of failed ones
        older than ``failed_body_retention_s``; returns how many entries went."""
        now = time.time() if now is None else now
        cutoff = now - self.retention_s

        def op(conn: sqlite3.Connection) -> int:
            conn.execute(
                "UPDATE requests SET request_json = x'' WHERE finished_at < ? AND length(request_json) > 0",
                (now - self.failed_body_retention_s,),
            )
            conn.execute(
                "DELETE FROM blobs WHERE request_id IN (SELECT request_id FROM requests WHERE finished_at < ?)",
                (cutoff,),
            )
            return conn.execute("DELETE FROM requests WHERE finished_at < ?", (cutoff,)).rowcount

        return await self._call(op)


def _known(conn: sqlite3.Connection, row: sqlite3.Row) -> Recorded:
    entry = JournalEntry(**dict(row))
    if entry.finished_at is None:
        return Recorded(Recording.IN_FLIGHT, entry, [])
    rows = conn.execute("SELECT data FROM blobs WHERE request_id = ? ORDER BY idx", (entry.request_id,))
    return Recorded(Recording.FINISHED, entry, [bytes(r["data"]) for r in rows])


BLOB_CHUNK_BYTES = 1024 * 1024


def _insert_request(
    conn: sqlite3.Connection,
    request_id: str,
    generator: str,
    body: str | bytes | bytearray,
    now: float,
    owner: str | None = None,
) -> None:
    """Insert a request row. A big body (megabytes of inline images) is written a megabyte at
    a time through incremental blob I/O: binding it whole holds the GIL for the full copy."""
    data = body.encode() if isinstance(body, str) else body
    if len(data) <= BLOB_CHUNK_BYTES:
        conn.execute(
            "INSERT INTO requests (request_id, generator, request_json, accepted_at, owner) VALUES (?, ?, ?, ?, ?)",
            (request_id, generator, data, now, owner),
        )
        return
    cursor = conn.execute(
        "INSERT INTO requests (request_id, generator, request_json, accepted_at, owner) "
        "VALUES (?, ?, zeroblob(?), ?, ?)",
        (request_id, generator, len(data), now, owner),
    )
    view = memoryview(data)
    with conn.blobopen("requests", "request_json", cursor.lastrowid or 0) as blob:
        for start in range(0, len(view), BLOB_CHUNK_BYTES):
            blob.write(view[start : start + BLOB_CHUNK_BYTES])


def recent_entries(state_dir: Path, *, limit: int = 50) -> list[JournalEntry]:
    """Newest entries first, read-only (for ``image-server jobs``; safe while serving)."""
    path = Path(state_dir) / JOURNAL_FILE
    if not path.exists():
        return []
    conn = connect(path, readonly=True)
    try:
        rows = conn.execute("SELECT * FROM requests ORDER BY accepted_at DESC LIMIT ?", (limit,)).fetchall()
        return [JournalEntry(**dict(row)) for row in rows]
    finally:
        conn.close()
