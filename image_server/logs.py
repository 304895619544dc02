"""Logging helpers: a rate-limited logger for lines a peer can trigger at will."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    """At most ``per_interval`` lines per ``interval_s``; then one line saying how many were
    suppressed, so a flood of bad messages cannot flood the log."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        per_interval: int,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.per_interval = per_interval
        self.interval_s = interval_s
        self.clock = clock
        self._window_start = float("-inf")
        self._count = 0
        self.suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = self.clock()
        if now - self._window_start >= self.interval_s:
            if self.suppressed:
                self.logger.warning(
                    "%d similar warnings suppressed in the last %.0fs", self.suppressed, self.interval_s
                )
            self._window_start, self._count, self.suppressed = now, 0, 0
        if self._count < self.per_interval:
            self._count += 1
            self.logger.warning(message, *args)
        else:
            self.suppressed += 1
