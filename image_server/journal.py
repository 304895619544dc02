"""The journal: every accepted request and its terminal event, in SQLite (WAL).

All SQLite work runs on one writer thread. Operations queued while it is busy are
committed together (group commit), so a burst of requests costs one fsync-free WAL commit
per batch, and the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from image_server.checkpoint import WalCheckpointer
from image_server.journal_db import (
    BLOB_CHUNK_BYTES,
    JOURNAL_FILE,
    JournalEntry,
    QuotaExceeded,
    Recorded,
    Recording,
    connect,
    insert_request,
    known_entry,
    recent_entries,
    used_bytes,
)
from image_server.known_ids import IdFilter, KnownIds

__all__ = [
    "BLOB_CHUNK_BYTES",
    "JOURNAL_FILE",
    "Journal",
    "JournalEntry",
    "QuotaExceeded",
    "Recorded",
    "Recording",
    "connect",
    "recent_entries",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_Op = tuple[Callable[[sqlite3.Connection], Any], Future[Any]]


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
        self.checkpointer = WalCheckpointer(self.path)
        self.known = KnownIds()
        self._rows_at_open = 0
        self._rebuilding: asyncio.Task[None] | None = None
        # Writer thread only: the size measured in this batch (``_check_quota``), and the ids
        # whose request_frames rows may exist (so a finish without any skips the DELETE).
        self._batch_used: int | None = None
        self._with_frames: set[str] = set()

    async def __aenter__(self) -> Journal:
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._writer, args=(ready,), name="journal", daemon=True)
        self._thread.start()
        await asyncio.wrap_future(ready)
        self.checkpointer.start()
        self._rebuild_known_soon()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._thread is None:
            return
        if self._rebuilding is not None:
            self._rebuilding.cancel()
            await asyncio.gather(self._rebuilding, return_exceptions=True)
        self._ops.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        await asyncio.to_thread(self.checkpointer.stop)

    def _writer(self, ready: Future[None]) -> None:
        try:
            conn = connect(self.path)
            conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's thread does it
            self._rows_at_open = conn.execute("SELECT count(*) FROM requests").fetchone()[0]
            self._with_frames = {row[0] for row in conn.execute("SELECT DISTINCT request_id FROM request_frames")}
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
                    if self.checkpointer.writer_must_restart():
                        self._restart_wal(conn)
                if stop:
                    return
        finally:
            conn.close()

    def _restart_wal(self, conn: sqlite3.Connection, *, give_up_s: float = 2.0) -> None:
        """Restart the WAL before writing on: the checkpointer's own pass (or a reader) may
        be in the way for a while, and writing on meanwhile is what grows the WAL."""
        deadline = time.monotonic() + give_up_s
        error: sqlite3.Error | None = None
        while True:
            try:
                busy = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0]
                error = None
            except sqlite3.Error as exc:
                busy, error = 1, exc
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(0.002)
        if busy:
            logger.warning("journal: the WAL could not be restarted (%s); writing on", error or "busy")

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
        self._batch_used = None
        # Each op of a batch runs in a savepoint, so a failing one is undone alone. A batch of
        # one needs none (its failure undoes the transaction): every statement the writer runs
        # is two GIL hand-offs with the event loop, and most batches hold one op.
        alone = len(batch) == 1
        undone = False
        for fn, future in batch:
            if not future.set_running_or_notify_cancel():
                continue  # its caller was cancelled before the op ran: skip it
            if not alone:
                conn.execute("SAVEPOINT op")
            try:
                results.append((future, fn(conn), None))
                if not alone:
                    conn.execute("RELEASE op")
            except Exception as exc:
                if alone:
                    conn.execute("ROLLBACK")
                    undone = True
                else:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                results.append((future, None, exc))
        try:
            if not undone:
                conn.execute("COMMIT")
                self.commits += 1
                self.checkpointer.committed()
        except Exception as exc:
            logger.exception("journal commit failed")
            results = [(future, None, exc) for future, _, _ in results]
        for future, value, error in results:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._submit(fn)

    def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue ``fn`` for the writer thread now; its result as a future of the loop."""
        future: Future[T] = Future()
        if self._thread is None:
            future.set_exception(RuntimeError("the journal is not open"))
        else:
            self._ops.put((fn, future))
        return asyncio.wrap_future(future)

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
        return await self.admit_soon(request_id, generator, request_json, frames, owner=owner)

    def admit_soon(
        self,
        request_id: str,
        generator: str,
        request_json: str | bytes | bytearray,
        frames: Sequence[bytes | bytearray] = (),
        *,
        owner: str | None = None,
    ) -> asyncio.Future[Recorded]:
        """``admit``, queued before this returns: the writer thread starts on it while the
        caller goes on (the service renders meanwhile)."""
        size = len(request_json) + sum(len(frame) for frame in frames)
        self._note_id(request_id)

        def op(conn: sqlite3.Connection) -> Recorded:
            now = time.time()
            # Inserted first, the quota checked after: a new id (nearly every one) costs one
            # statement, and a known one is answered from its row even past the quota. Past
            # it, the raise undoes the insert.
            if not insert_request(conn, request_id, generator, request_json, now, owner):
                row = conn.execute("SELECT * FROM requests WHERE request_id = ?", (request_id,)).fetchone()
                if row is None:  # OR IGNORE also skips a row that breaks a NOT NULL constraint
                    raise sqlite3.IntegrityError(f"request {request_id!r} could not be journaled")
                return known_entry(conn, row)
            self._check_quota(conn, size)
            if frames:
                self._with_frames.add(request_id)
                conn.executemany(
                    "INSERT OR REPLACE INTO request_frames (request_id, idx, data) VALUES (?, ?, ?)",
                    [(request_id, index, frame) for index, frame in enumerate(frames)],
                )
            entry = JournalEntry(request_id, generator, request_json, now, owner=owner)
            return Recorded(Recording.NEW, entry, [])

        return self._submit(op)

    def _check_quota(self, conn: sqlite3.Connection, needed: int) -> None:
        """Raise ``QuotaExceeded`` if ``needed`` more bytes would pass ``max_bytes``. The size
        is measured once per batch and then counted up (never down: a failed op's bytes
        still count until the next batch measures again)."""
        if self._batch_used is None:
            self._batch_used = self.used_bytes = used_bytes(conn)
        if self.max_bytes is not None and self._batch_used + needed > self.max_bytes:
            raise QuotaExceeded(self._batch_used, needed, self.max_bytes)
        self._batch_used += needed

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
        self._note_id(request_id)

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
                    return known_entry(conn, row)  # already finished: the stored event stands
                self._check_quota(conn, len(terminal_json) + sum(len(blob) for blob in blobs))
                conn.execute(
                    "INSERT INTO requests (request_id, generator, request_json, accepted_at, finished_at, outcome, "
                    "code, terminal, total_ms, owner) VALUES (?, ?, x'', ?, ?, ?, ?, ?, ?, ?)",
                    (request_id, generator, now, now, outcome, code, terminal_json, total_ms, owner),
                )
            if request_id in self._with_frames:
                self._with_frames.discard(request_id)
                conn.execute("DELETE FROM request_frames WHERE request_id = ?", (request_id,))
            if blobs:
                conn.executemany(
                    "INSERT OR REPLACE INTO blobs (request_id, idx, data) VALUES (?, ?, ?)",
                    [(request_id, i, blob) for i, blob in enumerate(blobs)],
                )
            entry = JournalEntry(request_id, generator, b"", now, now, outcome, code, terminal_json, total_ms, owner)
            return Recorded(Recording.NEW, entry, list(blobs))

        return await self._call(op)

    # -- the ids it holds, known on the loop (known_ids.py) ---------------------------

    def surely_new(self, request_id: str) -> bool:
        """True when the journal certainly has no row for ``request_id`` (no SQLite read)."""
        return not self.known.may_know(request_id)

    def _note_id(self, request_id: str) -> None:
        """Before its row is queued: an id the journal may hold from now on."""
        self.known.add(request_id)
        if self.known.needs_rebuild and self._rebuilding is None:
            self._rebuild_known_soon()

    def _rebuild_known_soon(self) -> None:
        self._rebuilding = asyncio.get_running_loop().create_task(self._rebuild_known(), name="journal-known-ids")

    async def _rebuild_known(self) -> None:
        target = self.known.start_rebuild(self._rows_at_open)
        try:
            # Resolves after the commit of every op queued before start_rebuild: the read
            # below then sees each id that went into the old filter only.
            await self._call(lambda conn: None)
            await asyncio.to_thread(self._fill_known, target)
        except BaseException:
            self.known.abandon(target)
            raise
        finally:
            self._rebuilding = None

    def _fill_known(self, target: IdFilter) -> None:
        """Worker thread, own read-only connection (WAL: the writer goes on meanwhile)."""
        conn = connect(self.path, readonly=True)
        try:
            self.known.fill(target, (row[0] for row in conn.execute("SELECT request_id FROM requests")))
        finally:
            conn.close()

    async def lookup(self, request_id: str) -> Recorded | None:
        """What the journal knows about ``request_id`` (``None``: nothing)."""

        def op(conn: sqlite3.Connection) -> Recorded | None:
            row = conn.execute("SELECT * FROM requests WHERE request_id = ?", (request_id,)).fetchone()
            return None if row is None else known_entry(conn, row)

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
            # A finished request's frames go at its finish; a finish whose transaction did
            # not commit after its id left _with_frames would otherwise leave them here.
            conn.execute(
                "DELETE FROM request_frames WHERE request_id IN "
                "(SELECT request_id FROM requests WHERE finished_at IS NOT NULL)"
            )
            return conn.execute("DELETE FROM requests WHERE finished_at < ?", (cutoff,)).rowcount

        return await self._call(op)
