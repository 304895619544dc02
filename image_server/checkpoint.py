"""WAL checkpoints on a thread of their own, never inside a request's commit.

SQLite checkpoints a WAL database when a commit takes the WAL past 1,000 pages
(``wal_autocheckpoint``), inside that commit: every ~100 requests one journal write took
2.5-4 ms instead of 0.1 ms, which was the p99 of a request (benchmarks/README.md, figure 1).
The writer connection turns that off (``PRAGMA wal_autocheckpoint=0``) and this thread, on a
connection of its own, runs ``PRAGMA wal_checkpoint(PASSIVE)`` after every ``every_commits``
commits, or every ``interval_s`` when commits are fewer. A passive checkpoint never waits for
the writer and the writer never waits for it (WAL lets both run at once), so requests stop
paying for it. The WAL starts over from its beginning when a write finds every frame copied;
a writer that never pauses can outrun that, so past ``RESTART_WAL_BYTES`` one checkpoint
waits for the writer (``RESTART``), and past ``HARD_WAL_BYTES`` the writer restarts it
itself before going on, which bounds the WAL (tests/test_journal.py).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

# SQLite's own default threshold is 1,000 pages; a request writes about ten.
EVERY_COMMITS = 100
INTERVAL_S = 1.0
# A passive checkpoint that keeps racing a busy writer may never let the WAL start over;
# past this size one checkpoint waits for the writer (RESTART), so the WAL stays bounded.
RESTART_WAL_BYTES = 16 * 1024 * 1024
CATCH_UP_PASSES = 20
# One passive pass can take 100 ms (it syncs the database file) while a writer that never
# pauses appends 20 MB more. Past this, the writer itself restarts the WAL before its next
# batch: rare (sustained write floods only), and what keeps the bound a bound.
HARD_WAL_BYTES = RESTART_WAL_BYTES + 4 * 1024 * 1024


class WalCheckpointer:
    def __init__(self, path: Path, *, every_commits: int = EVERY_COMMITS, interval_s: float = INTERVAL_S) -> None:
        self.path = path
        self.every_commits = every_commits
        self.interval_s = interval_s
        self.checkpoints = 0
        self._commits = 0
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="journal-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """Called by the writer thread after each commit (cheap: a counter, sometimes a wake-up)."""
        self._commits += 1
        if self._commits >= self.every_commits:
            self._wake.set()

    def writer_must_restart(self) -> bool:
        """Writer thread, after a commit: True when the WAL outgrew the checkpointer."""
        return self._wal_bytes() > HARD_WAL_BYTES

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop = True
        self._wake.set()
        self._thread.join()
        self._thread = None

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=5000")
        try:
            while not self._stop:
                self._wake.wait(self.interval_s)
                self._wake.clear()
                if self._commits == 0 or self._stop:
                    continue
                self._commits = 0
                try:
                    # A writer that never pauses can outgrow passive passes by tens of MB
                    # (measured: 17 -> 38 MB during one catch-up): past the limit, restart now.
                    if self._wal_bytes() <= RESTART_WAL_BYTES:
                        self._catch_up(conn)
                    if self._wal_bytes() > RESTART_WAL_BYTES:
                        conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
                except sqlite3.Error as exc:  # a busy or failing disk: the next round tries again
                    logger.warning("journal checkpoint failed: %s", exc)
        finally:
            conn.close()

    def _catch_up(self, conn: sqlite3.Connection) -> None:
        """Passive checkpoints until one finds no frame committed since the one before: the
        WAL starts over from its beginning only when a write begins with every frame copied,
        and each pass copies only what was there when it began (the writer goes on meanwhile)."""
        previous = -1
        for _ in range(CATCH_UP_PASSES):
            _, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()[0]
            self.checkpoints += 1
            if (frames == copied == previous) or self._stop or self._wal_bytes() > RESTART_WAL_BYTES:
                return
            previous = frames if frames == copied else -1

    def _wal_bytes(self) -> int:
        try:
            return self.path.with_name(self.path.name + "-wal").stat().st_size
        except FileNotFoundError:
            return 0
