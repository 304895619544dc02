"""Is a folder writable right now? Checked by writing, since permissions do not stop root and
do not show a full disk or a read-only mount."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def writable_problem(folder: Path) -> str | None:
    """None when a small file can be created, written and removed in ``folder`` (created if
    missing); otherwise ``"<folder> not writable: <reason>"``. Blocking: call it in a thread."""
    probe = folder / f".write-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"probe\n" * 16)
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        return f"{folder} not writable: {exc.strerror or type(exc).__name__}"
    return None
