"""Throttle a request's provider progress: at most one ``generating`` event per interval,
and the latest one is never lost (it goes out when the interval ends)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from schemas import RenderProgress

PROGRESS_INTERVAL_S = 0.1  # at most ten provider progress events a second per request


class ProgressThrottle:
    """Stage changes (queued, started, storing) pass at once; ``generating`` updates are
    rate limited with a trailing edge, so a final 100% is still published."""

    def __init__(self, send: Callable[[RenderProgress], None], *, interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self._send = send
        self._interval_s = interval_s
        self._last_generating = float("-inf")
        self._trailing: RenderProgress | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, event: RenderProgress) -> None:
        if event.stage != "generating":
            self.cancel()  # a newer stage makes a pending provider update stale
            self._send(event)
            return
        loop = asyncio.get_running_loop()
        wait = self._last_generating + self._interval_s - loop.time()
        if wait <= 0 and self._timer is None:
            self._emit(event)
            return
        self._trailing = event
        if self._timer is None:
            self._timer = loop.call_later(max(wait, 0.0), self._flush)

    def _emit(self, event: RenderProgress) -> None:
        self._last_generating = asyncio.get_running_loop().time()
        self._send(event)

    def _flush(self) -> None:
        self._timer = None
        event, self._trailing = self._trailing, None
        if event is not None:
            self._emit(event)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._trailing = None
