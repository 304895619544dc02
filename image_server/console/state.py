"""What the console shows, folded from the service's events: recent renders, work in flight,
and each generator's recent error rate. Pure bookkeeping: no I/O, no sockets."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas import ImageReady, RenderAccepted, RenderError, RenderProgress, ServiceStatus

# Outcomes remembered per generator for the error rate shown on the page.
OUTCOME_WINDOW = 50
# Endings that say nothing about a generator's health: the client's doing, or the content's.
NOT_THE_GENERATORS_FAULT = frozenset(
    {
        "cancelled",
        "superseded",
        "invalid_request",
        "unknown_generator",
        "unsupported",
        "reference_image",
        "prompt_too_long",
        "overloaded",
        "content_policy",
    }
)


@dataclass
class Card:
    """One finished render, as a gallery card: an image or a failure."""

    request_id: str
    generator: str | None
    ok: bool
    finished_at: float
    prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    image: str | None = None  # path relative to the output dir, when the image is a file there
    timings: dict[str, float] = field(default_factory=dict)
    code: str | None = None
    message: str | None = None


@dataclass
class Running:
    """A request between ``RenderAccepted`` and its terminal event."""

    request_id: str
    generator: str | None
    stage: str = "queued"
    progress: float | None = None
    queue_position: int | None = None
    prompt: str | None = None
    mine: bool = False  # sent by this console, so its cancel is honoured
    since: float = field(default_factory=time.time)


Update = tuple[str, Any]  # ("card", Card) | ("running", Running) | ("done", request_id) | ("generators", rows)


class ConsoleState:
    """Folds events into cards, running requests and generator health; ``apply`` says what changed."""

    def __init__(self, output_dir: Path, *, recent: int = 60) -> None:
        self.output_dir = output_dir.resolve()
        self.cards: deque[Card] = deque(maxlen=recent)
        self.running: dict[str, Running] = {}
        self.outcomes: dict[str, deque[bool]] = {}
        self.generators: list[dict[str, Any]] = []
        self.sent: dict[str, str] = {}  # request_id -> prompt, for requests this console sent

    def note_sent(self, request_id: str, prompt: str) -> None:
        self.sent[request_id] = prompt

    def apply(self, event: object) -> list[Update]:
        if isinstance(event, RenderAccepted):
            return [("running", self._running(event.request_id, event.generator, event.queue_position))]
        if isinstance(event, RenderProgress):
            running = self._running(event.request_id, event.generator, event.queue_position)
            running.stage = event.stage
            if event.progress is not None:
                running.progress = event.progress
            return [("running", running)]
        if isinstance(event, ImageReady):
            return self._finish(self._card_for_image(event))
        if isinstance(event, RenderError):
            card = Card(
                event.request_id,
                event.generator,
                ok=False,
                finished_at=time.time(),
                prompt=self.sent.get(event.request_id),
                code=event.code,
                message=event.message,
            )
            return self._finish(card)
        if isinstance(event, ServiceStatus):
            self.generators = [self._generator_row(g.model_dump()) for g in event.generators]
            return [("generators", self.generators)]
        return []

    def error_rate(self, generator: str) -> float | None:
        outcomes = self.outcomes.get(generator)
        if not outcomes:
            return None
        return round(sum(not ok for ok in outcomes) / len(outcomes), 3)

    def _running(self, request_id: str, generator: str | None, queue_position: int | None) -> Running:
        running = self.running.get(request_id)
        if running is None:
            prompt = self.sent.get(request_id)
            running = Running(request_id, generator, prompt=prompt, mine=prompt is not None)
            self.running[request_id] = running
        running.generator = generator or running.generator
        if queue_position is not None:
            running.queue_position = queue_position
        return running

    def _card_for_image(self, event: ImageReady) -> Card:
        first = event.images[0] if event.images else None
        return Card(
            event.request_id,
            event.generator,
            ok=True,
            finished_at=time.time(),
            prompt=event.prompt,
            width=first.width if first else None,
            height=first.height if first else None,
            seed=first.seed if first else None,
            image=self.relative(first.path) if first and first.path else None,
            timings=event.timings.model_dump(),
        )

    def _finish(self, card: Card) -> list[Update]:
        self.running.pop(card.request_id, None)
        if any(seen.request_id == card.request_id for seen in self.cards):
            return [("done", card.request_id)]  # a re-published terminal event
        self.sent.pop(card.request_id, None)
        self.cards.appendleft(card)
        if card.generator and card.code not in NOT_THE_GENERATORS_FAULT:
            self.outcomes.setdefault(card.generator, deque(maxlen=OUTCOME_WINDOW)).append(card.ok)
        self.generators = [self._generator_row(row) for row in self.generators]
        return [("done", card.request_id), ("card", card), ("generators", self.generators)]

    def _generator_row(self, row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "error_rate": self.error_rate(str(row.get("name")))}

    def relative(self, path: str) -> str | None:
        """``path`` relative to the output dir, or None when it lies elsewhere."""
        try:
            return Path(path).resolve().relative_to(self.output_dir).as_posix()
        except ValueError:
            return None
