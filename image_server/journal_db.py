"""The journal's SQLite file: its schema, the rows it holds, opening it privately, reading it.

``image_server.journal.Journal`` does all writing, on its one thread; this module holds
what that thread and read-only readers (``image-server jobs``) share.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

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


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    else:
        create_private(path)
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


def create_private(path: Path) -> None:
    """The journal holds prompts, images and metadata: its folder 0700, the file 0600. SQLite
    gives its -wal and -shm files the database file's mode."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)  # mkdir's mode is masked by the umask, and the folder may be old
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes the journal's live pages take (freed pages are reused before the file grows)."""
    # One statement: each one the writer thread runs is a GIL hand-off with the event loop.
    (used,) = conn.execute(
        "SELECT (p.page_count - f.freelist_count) * s.page_size "
        "FROM pragma_page_count() AS p, pragma_freelist_count() AS f, pragma_page_size() AS s"
    ).fetchone()
    return int(used)


def known_entry(conn: sqlite3.Connection, row: sqlite3.Row) -> Recorded:
    entry = JournalEntry(**dict(row))
    if entry.finished_at is None:
        return Recorded(Recording.IN_FLIGHT, entry, [])
    rows = conn.execute("SELECT data FROM blobs WHERE request_id = ? ORDER BY idx", (entry.request_id,))
    return Recorded(Recording.FINISHED, entry, [bytes(r["data"]) for r in rows])


BLOB_CHUNK_BYTES = 1024 * 1024


def insert_request(
    conn: sqlite3.Connection,
    request_id: str,
    generator: str,
    body: str | bytes | bytearray,
    now: float,
    owner: str | None = None,
) -> bool:
    """Insert a request row unless ``request_id`` has one; whether it was inserted. A big body
    (megabytes of inline images) is written a megabyte at a time through incremental blob
    I/O: binding it whole holds the GIL for the full copy."""
    data = body.encode() if isinstance(body, str) else body
    if len(data) <= BLOB_CHUNK_BYTES:
        cursor = conn.execute(
            "INSERT OR IGNORE INTO requests (request_id, generator, request_json, accepted_at, owner) "
            "VALUES (?, ?, ?, ?, ?)",
            (request_id, generator, data, now, owner),
        )
        return cursor.rowcount == 1
    cursor = conn.execute(
        "INSERT OR IGNORE INTO requests (request_id, generator, request_json, accepted_at, owner) "
        "VALUES (?, ?, zeroblob(?), ?, ?)",
        (request_id, generator, len(data), now, owner),
    )
    if cursor.rowcount != 1:
        return False
    view = memoryview(data)
    with conn.blobopen("requests", "request_json", cursor.lastrowid or 0) as blob:
        for start in range(0, len(view), BLOB_CHUNK_BYTES):
            blob.write(view[start : start + BLOB_CHUNK_BYTES])
    return True


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
