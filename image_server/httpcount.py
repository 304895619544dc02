"""Count the HTTP responses the service receives (providers, reference downloads) by host
and status, without touching a provider.

Every provider client here (fal-client included) goes through httpx, and httpx logs each
response at INFO on the ``httpx`` logger with the URL and status as arguments. A filter on
that logger counts the response and drops the record: those lines stay out of the log as
before (their URLs can carry account ids). The filter is process-wide: with several services
in one process, the first one installed counts for all.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

HTTPX_LOGGER = "httpx"
_RESPONSE_LINE = "HTTP Request:"


class ResponseCounter(logging.Filter):
    def __init__(self, counter: Any) -> None:  # a prometheus Counter labelled (host, status)
        super().__init__()
        self.counter = counter

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        args = record.args
        if isinstance(record.msg, str) and record.msg.startswith(_RESPONSE_LINE) and isinstance(args, tuple):
            if len(args) == 5:
                url, status = args[1], args[3]
                host = getattr(url, "host", "") or "unknown"
                self.counter.labels(host, str(status)).inc()
        return False  # never logged: the URL may hold account ids


@contextmanager
def counting_http_responses(counter: Any) -> Iterator[None]:
    """While inside, count httpx's responses into ``counter``."""
    log = logging.getLogger(HTTPX_LOGGER)
    previous = log.level
    counting = ResponseCounter(counter)
    log.addFilter(counting)
    log.setLevel(logging.INFO)  # records must be made for the filter to see them
    try:
        yield
    finally:
        log.removeFilter(counting)
        log.setLevel(previous)
