"""One request in flight: what the tracker, its early endings and its task share."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from image_server.errors import ImageServerError
from image_server.identity import Ticket
from image_server.journal import Recorded
from image_server.pipeline import RenderPlan
from image_server.progress import ProgressThrottle
from schemas import RenderError, RenderProgress, RenderRequest


class NotAdmitted(Exception):
    """Raised inside a render that started while its request was being journaled, when the
    journal did not take it (a refusal, or a repeat of a finished request)."""


@dataclass(frozen=True)
class Admission:
    """How journaling a request went: accepted (neither field), refused, or a repeat."""

    refusal: RenderError | None = None  # not journaled: this is its terminal event
    repeat: Recorded | None = None  # the id had finished before: its stored event answers

    @property
    def admitted(self) -> bool:
        return self.refusal is None and self.repeat is None


@dataclass
class Active:
    request: RenderRequest
    ticket: Ticket
    plan: RenderPlan
    received_at: float
    task: asyncio.Task[None] | None = None
    accepted: bool = False  # journaled and RenderAccepted published
    end_reason: ImageServerError | None = None
    throttle: ProgressThrottle | None = None
    started: bool = False  # its task has begun to run, so cancelling it reaches its handlers
    raw: bytes | bytearray | None = None  # the request's JSON as received, journaled as is
    frames: Sequence[bytes | bytearray] = ()  # images sent as extra frames (ImageSource.frame)
    resumed: bool = False  # taken up again from the journal after a restart
    admission: asyncio.Task[Admission] | None = None  # journaling it, alongside the render
    held_progress: list[RenderProgress] = field(default_factory=list)  # until RenderAccepted is out
    speculating: bool = False  # rendering while the journal has not answered yet
    not_admitted: bool = False  # its render was stopped because the journal did not take it

    @property
    def generator(self) -> str:
        return self.plan.generator

    @property
    def estimated_cost(self) -> float | None:
        """For RenderAccepted: the plan's estimate (a batch: once per member)."""
        estimate: float | None = getattr(self.plan, "estimated_cost", None)
        return estimate * len(self.request.prompts) if estimate is not None and self.request.prompts else estimate
