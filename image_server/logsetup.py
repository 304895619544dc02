"""Logging for the CLI: ISO-8601 timestamps, text or JSON lines, stderr and an optional
rotated file, written by a listener thread so the event loop only queues records.

A weeks-long run needs dates in every line (``HH:MM:SS`` alone is ambiguous), and log
shippers want one JSON object a line with the request's fields as fields.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
from datetime import datetime
from pathlib import Path
from typing import Any

# Fields a log call can attach with ``extra={...}``; the JSON format emits them as they are.
CONTEXT_FIELDS = ("request_id", "generator", "code", "duration_ms")


def iso_time(created: float) -> str:
    """``2026-11-30T05:02:55.123+00:00``: local time with milliseconds and its offset."""
    return datetime.fromtimestamp(created).astimezone().isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        return iso_time(record.created)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(
    level: str, *, fmt: str = "text", file: Path | None = None, max_bytes: int = 0, backups: int = 0
) -> None:
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        )
    for handler in handlers:
        handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.setLevel(level.upper())
    # httpx logs every request URL at INFO; some URLs carry account ids.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, *handlers, respect_handler_level=True)
    root.addHandler(logging.handlers.QueueHandler(records))
    listener.start()
    atexit.register(listener.stop)  # flushes what is queued before the process exits
