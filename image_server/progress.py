"""A request's progress events: throttled (at most one ``generating`` event per interval,
the latest never lost) and held until its ``RenderAccepted`` is out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from schemas import RenderProgress

if TYPE_CHECKING:
    from image_server.active import Active
    from image_server.publisher import EventPublisher

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


class ProgressRelay:
    """Builds each request's progress events and sends them through ``publisher``; what a
    render reports before it is accepted waits (nothing is sent before RenderAccepted)."""

    def __init__(self, publisher: EventPublisher) -> None:
        self.publisher = publisher

    def report(
        self, active: Active, stage: str, fraction: float | None, message: str | None, position: int | None
    ) -> None:
        if active.throttle is None:
            active.throttle = ProgressThrottle(lambda event: self._send(active, event))
        active.throttle(
            RenderProgress(
                request_id=active.request.request_id,
                stage=stage,
                generator=active.generator,
                queue_position=position,
                progress=fraction,
                message=message,
            )
        )

    def accepted(self, active: Active) -> None:
        """``active``'s RenderAccepted is out: send what it held back, in order."""
        held, active.held_progress = active.held_progress, []
        for event in held:
            self._send(active, event)

    def stop(self, active: Active) -> None:
        """No progress after the terminal event."""
        if active.throttle is not None:
            active.throttle.cancel()

    def _send(self, active: Active, event: RenderProgress) -> None:
        if not active.accepted:
            held = active.held_progress
            if held and held[-1].stage == event.stage == "generating":
                held[-1] = event  # provider updates: the latest one says it all
            else:
                held.append(event)
            return
        self.publisher.publish_nowait(event, reply_to=active.ticket.reply_to)
