"""An exclusive lock on the state directory, so two services never share one journal.

``flock`` on ``state_dir/service.lock``: the kernel drops the lock when its holder dies, so a
lock left by a killed process is free at once and no PID guessing is needed to take it over.
The file holds the holder's PID only to name it in the refusal.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from image_server.errors import ImageServerError

logger = logging.getLogger(__name__)
LOCK_FILE = "service.lock"


class StateDirLocked(ImageServerError):
    """Another running service holds the state directory."""


class StateLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ``StateDirLocked`` naming the holder's PID."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StateDirLocked(
                f"state dir {self.path.parent} is in use by another service (pid {holder or 'unknown'}); "
                "stop it or give this one its own state_dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        previous = _read_pid(fd)
        if previous and previous != os.getpid():
            logger.info("took over the state dir lock left by pid %s (no longer running)", previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        # The file stays: unlinking it could let a third process lock a new inode while a
        # second still waits on the old one.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or "0") or None
    except (OSError, ValueError):
        return None


def state_dir_in_use(state_dir: Path) -> bool:
    """True while a service holds ``state_dir`` (for ``image-server jobs``: its unfinished
    requests are running; with no holder they were interrupted)."""
    path = Path(state_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a shared lock taken just now
    return False
