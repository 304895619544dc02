"""A request's progress events on their way out: built, throttled (``progress``) and held
until its ``RenderAccepted`` is out (a render may start while it is being journaled)."""

from __future__ import annotations

from image_server.active import Active
from image_server.progress import ProgressThrottle
from image_server.publisher import EventPublisher
from schemas import RenderProgress


class ProgressRelay:
    """Builds each request's progress events and sends them through ``publisher``; what a
    render reports before it is accepted waits (nothing is sent before RenderAccepted)."""

    def __init__(self, publisher: EventPublisher) -> None:
        self.publisher = publisher

    def report(
        self, active: Active, stage: str, fraction: float | None, message: str | None, position: int | None
    ) -> None:
        if not self.publisher.wants("RenderProgress", active.ticket.reply_to):
            return  # nobody subscribed: not even built (a plain RenderClient does not)
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
