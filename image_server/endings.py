"""Ending requests before they finish: cancel, supersede on a channel, clear_queue.

Each acts only on requests of the same client (its ``Ticket.owner``): a client can never
end another's work. Ending a request cancels its task; the task itself then publishes the
reason as its one terminal event, through the Outbox.
"""

from __future__ import annotations

import logging
from collections import Counter

from image_server.active import Active
from image_server.errors import Cancelled, ImageServerError, Superseded
from image_server.scheduler import Scheduler

logger = logging.getLogger(__name__)


class Endings:
    def __init__(self, active: dict[str, Active], scheduler: Scheduler, counters: Counter[str]) -> None:
        self.active = active  # the tracker's requests in flight, shared
        self.scheduler = scheduler
        self.counters = counters
        self._channels: dict[tuple[str, str], str] = {}  # (owner, channel) -> request id

    def cancel(self, request_id: str, owner: str) -> bool:
        """End ``request_id`` with ``cancelled``; False when it is not in flight or belongs to
        another client than ``owner``."""
        active = self.active.get(request_id)
        if active is None:
            return False
        if active.ticket.owner != owner:
            self.counters["foreign_cancels"] += 1
            logger.warning("cancel for %s refused: it belongs to another client", request_id)
            return False
        self.end(active, Cancelled("cancelled by request", request_id=request_id))
        return True

    def end(self, active: Active, reason: ImageServerError) -> None:
        """Cancel a request's task; the task itself publishes ``reason`` as its terminal event."""
        if active.end_reason is None and active.task is not None:
            active.end_reason = reason
            # A task cancelled before its first step never runs its handlers and the request
            # would vanish (a CancelRequest right behind its RenderRequest does that); a task
            # that has not started finds end_reason when it does.
            if active.started:
                active.task.cancel()

    def supersede_channel(self, active: Active) -> None:
        request = active.request
        assert request.channel is not None
        key = (active.ticket.owner, request.channel)
        older = self.active.get(self._channels.get(key, ""))
        if older is not None and older.ticket.owner == active.ticket.owner:
            self.end(older, Superseded(f"superseded by {request.request_id} on channel {request.channel}"))
        self._channels[key] = request.request_id

    def end_queued(self, clearing: Active, reason: ImageServerError) -> None:
        """End every request of the same client that has not started rendering."""
        for active in list(self.active.values()):
            if active is clearing or active.ticket.owner != clearing.ticket.owner:
                continue
            if self.scheduler.position(active.request.request_id) is not None:
                self.end(active, reason)

    def forget(self, active: Active) -> None:
        """``active`` has ended: its channel is free again."""
        key = (active.ticket.owner, active.request.channel or "")
        if active.request.channel and self._channels.get(key) == active.request.request_id:
            del self._channels[key]
