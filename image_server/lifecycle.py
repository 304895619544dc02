"""The life of each request inside the service, from admission to its one terminal event.

``RequestTracker`` owns the requests in flight (keyed by request id, one task each),
journals them before ``RenderAccepted`` and their terminal event before publishing it,
answers repeats, ends requests early (cancel, supersede, clear_queue) and resumes what a
previous run left unfinished.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from image_server.config import LimitsConfig
from image_server.errors import Cancelled, ImageServerError, InvalidRequest, Overloaded, Superseded
from image_server.journal import Admission as Recorded, Journal
from image_server.outcomes import error_event
from image_server.pipeline import Admission, RenderPipeline
from image_server.progress import ProgressThrottle
from image_server.publisher import EventPublisher
from schemas import MESSAGE_ADAPTER, ImageReady, RenderAccepted, RenderError, RenderProgress, RenderRequest

logger = logging.getLogger(__name__)


@dataclass
class Active:
    request: RenderRequest
    generator: str
    received_at: float
    task: asyncio.Task[None] | None = None
    accepted: bool = False  # journaled and RenderAccepted published
    end_reason: ImageServerError | None = None
    throttle: ProgressThrottle | None = None
    started: bool = False  # its task has begun to run, so cancelling it reaches its handlers
    raw: bytes | bytearray | None = None  # the request's JSON as received, journaled as is
    frames: Sequence[bytes | bytearray] = ()  # images sent as extra frames (ImageSource.frame)


class RequestTracker:
    def __init__(
        self,
        pipeline: RenderPipeline,
        publisher: EventPublisher,
        journal: Journal | None,
        limits: LimitsConfig,
        counters: Counter[str],
    ) -> None:
        self.pipeline = pipeline
        self.publisher = publisher
        self.journal = journal
        self.limits = limits
        self.counters = counters
        self.scheduler = pipeline.manager.scheduler
        self.active: dict[str, Active] = {}
        self._channels: dict[str, str] = {}
        self._per_client: Counter[str] = Counter()

    @property
    def queued(self) -> int:
        return len(self.active) - self.scheduler.in_flight

    def tasks(self) -> list[asyncio.Task[None]]:
        return [a.task for a in self.active.values() if a.task is not None]

    # -- arrival ----------------------------------------------------------------------

    async def on_render(
        self, request: RenderRequest, raw: bytes | bytearray | None = None, frames: Sequence[bytes | bytearray] = ()
    ) -> None:
        """Admit (or refuse) a request; ``raw`` is its JSON as received, if at hand, and
        ``frames`` the message's extra frames."""
        rid = request.request_id
        active = self.active.get(rid)
        if active is not None:
            # Idempotency: a repeat of a request in flight only gets its acceptance again
            # (once it is journaled; until then the client's next re-send will do).
            if active.accepted:
                await self._publish_accepted(active)
            return
        try:
            missing = sorted(index for index in request.frames_used() if index >= len(frames))
            if missing:
                raise InvalidRequest(
                    f"image frame(s) {missing} not in the message: it has {len(frames)} extra frame(s)",
                    request_id=rid,
                )
            admission = self.pipeline.admit(request)
            self._check_capacity(request)
        except ImageServerError as exc:
            self.counters["rejected"] += 1
            logger.info("! %s refused: %s", rid, exc.message)
            await self.publisher.publish(
                error_event(exc, request, generator=request.generator), reply_to=request.reply_to
            )
            return
        active = Active(request, admission.generator, time.perf_counter(), raw=raw, frames=frames)
        self._track(active)
        active.task = asyncio.create_task(self._admit_and_run(active, admission), name=f"render:{rid}")

    def _check_capacity(self, request: RenderRequest) -> None:
        limits = self.limits
        if len(self.active) >= limits.max_in_flight + limits.max_queued:
            raise Overloaded(f"service is at capacity ({len(self.active)} requests); try again later")
        per_client = limits.max_in_flight_per_client
        if per_client and self._per_client[request.reply_to or ""] >= per_client:
            raise Overloaded(
                f"client {request.reply_to or '(no reply_to)'} already has {per_client} requests in flight; "
                "wait for some to finish"
            )

    async def _admit_and_run(self, active: Active, admission: Admission) -> None:
        """Journal the request, publish RenderAccepted, then render (or answer a repeat)."""
        if await self._ended_before_start(active):
            return
        request = active.request
        if self.journal is not None:
            try:
                # Re-serializing a request with megabytes of inline images would hold the
                # loop for tens of ms; the bytes as received say the same.
                request_json = active.raw if active.raw is not None else request.model_dump_json().encode()
                active.raw = None
                recorded = await self.journal.admit(request.request_id, active.generator, request_json, active.frames)
            except asyncio.CancelledError:
                if active.end_reason is None:
                    raise
                await asyncio.shield(self._publish_terminal(active, error_event(active.end_reason, request)))
                return
            except Exception:
                # Not journaled means not accepted: say so rather than strand the request.
                logger.exception("! %s: the journal could not record it", request.request_id)
                self._untrack(active)
                failure = RenderError(
                    request_id=request.request_id,
                    code="internal",
                    message="the service could not journal the request; try again",
                    retryable=True,
                    metadata=request.metadata,
                )
                await self.publisher.publish(failure, reply_to=request.reply_to)
                return
            if recorded.admission is Recorded.FINISHED:
                # A repeat of a finished request: the stored terminal event, same content.
                self._untrack(active)
                self.counters["repeated"] += 1
                stored = MESSAGE_ADAPTER.validate_json(recorded.entry.terminal or "")
                await self.publisher.publish(stored, reply_to=request.reply_to, blobs=recorded.blobs)
                return
        self.counters["accepted"] += 1
        logger.info(
            "→ %s accepted for %s",
            request.request_id,
            active.generator,
            extra={"request_id": request.request_id, "generator": active.generator},
        )
        if request.clear_queue:
            self._end_queued(Superseded("cleared by a request with clear_queue", request_id=request.request_id))
        if request.channel:
            self._supersede_channel(request)
        active.accepted = True
        await self._publish_accepted(active)
        await self._run(active, admission)

    async def _publish_accepted(self, active: Active) -> None:
        position = self.scheduler.position(active.request.request_id) or 0
        accepted = RenderAccepted(
            request_id=active.request.request_id, generator=active.generator, queue_position=position
        )
        await self.publisher.publish(accepted, reply_to=active.request.reply_to)

    def _track(self, active: Active) -> None:
        self.active[active.request.request_id] = active
        self._per_client[active.request.reply_to or ""] += 1

    def _untrack(self, active: Active) -> None:
        if self.active.pop(active.request.request_id, None) is not None:
            key = active.request.reply_to or ""
            self._per_client[key] -= 1
            if self._per_client[key] <= 0:
                del self._per_client[key]

    # -- ending requests early --------------------------------------------------------

    def cancel(self, request_id: str) -> bool:
        """End ``request_id`` with ``cancelled``; False when it is not in flight."""
        active = self.active.get(request_id)
        if active is None:
            return False
        self._end(active, Cancelled("cancelled by request", request_id=request_id))
        return True

    def _end(self, active: Active, reason: ImageServerError) -> None:
        """Cancel a request's task; the task itself publishes ``reason`` as its terminal event."""
        if active.end_reason is None and active.task is not None:
            active.end_reason = reason
            # A task cancelled before its first step never runs its handlers and the request
            # would vanish (a CancelRequest right behind its RenderRequest does that); a task
            # that has not started finds end_reason when it does.
            if active.started:
                active.task.cancel()

    async def _ended_before_start(self, active: Active) -> bool:
        """Mark the task started; if the request was ended before that, publish its end."""
        active.started = True
        if active.end_reason is None:
            return False
        await self._publish_terminal(active, error_event(active.end_reason, active.request, generator=active.generator))
        return True

    def _supersede_channel(self, request: RenderRequest) -> None:
        assert request.channel is not None
        older = self.active.get(self._channels.get(request.channel, ""))
        if older is not None:
            self._end(older, Superseded(f"superseded by {request.request_id} on channel {request.channel}"))
        self._channels[request.channel] = request.request_id

    def _end_queued(self, reason: ImageServerError) -> None:
        """End every request that has not started rendering (waiting for a slot)."""
        for active in list(self.active.values()):
            if active.request.request_id == reason.request_id:
                continue
            if self.scheduler.position(active.request.request_id) is not None:
                self._end(active, reason)

    # -- running ----------------------------------------------------------------------

    async def _run(self, active: Active, admission: Admission) -> None:
        request = active.request
        blobs: list[bytes] = []
        try:
            # The request joins the scheduler's queue when pipeline.run asks for a slot, that
            # is when this task first yields: report its place then, if it really waits.
            asyncio.get_running_loop().call_soon(self._report_queued, active)
            outcome = await self.pipeline.run(
                request,
                admission,
                received_at=active.received_at,
                frames=active.frames,
                progress=lambda stage, fraction, message, position: self._progress(
                    active, stage, fraction, message, position
                ),
            )
            event: ImageReady | RenderError = outcome.event
            blobs = outcome.blobs
        except asyncio.CancelledError:
            if active.end_reason is None:
                raise  # shutdown: no terminal event is invented; the request stays unfinished
            event = error_event(active.end_reason, request, generator=active.generator)
        except ImageServerError as exc:
            event = error_event(exc, request, generator=active.generator)
        except Exception as exc:
            logger.exception("! %s failed unexpectedly", request.request_id)
            event = error_event(exc, request, generator=active.generator)
        await asyncio.shield(self._publish_terminal(active, event, blobs))

    def _report_queued(self, active: Active) -> None:
        position = self.scheduler.position(active.request.request_id)
        if position is not None and active.end_reason is None:
            self._progress(active, "queued", None, None, position)

    def _progress(
        self, active: Active, stage: str, fraction: float | None, message: str | None, position: int | None
    ) -> None:
        if active.throttle is None:
            active.throttle = ProgressThrottle(lambda event: self._send_progress(active, event))
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

    def _send_progress(self, active: Active, event: RenderProgress) -> None:
        self.publisher.publish_nowait(event, reply_to=active.request.reply_to)

    async def _publish_terminal(
        self, active: Active, event: ImageReady | RenderError, blobs: Sequence[bytes] = ()
    ) -> None:
        """Journal the terminal event, then publish it: exactly one per accepted request."""
        request = active.request
        rid = request.request_id
        if active.throttle is not None:
            active.throttle.cancel()  # no progress after the terminal event
        self._untrack(active)
        if request.channel and self._channels.get(request.channel) == rid:
            del self._channels[request.channel]
        if isinstance(event, ImageReady):
            self.counters["completed"] += 1
            logger.info(
                "← %s %s %.2fs",
                rid,
                event.generator,
                event.timings.total / 1000,
                extra={"request_id": rid, "generator": event.generator, "duration_ms": event.timings.total},
            )
        else:
            self.counters["failed"] += 1
            logger.info(
                "! %s %s: %s",
                rid,
                event.code,
                event.message,
                extra={"request_id": rid, "generator": event.generator, "code": event.code},
            )
        stamped = self.publisher.stamp(event)
        body = stamped.model_dump_json().encode()  # once: journaled and published as the same bytes
        if self.journal is not None:
            total = stamped.timings.total if isinstance(stamped, ImageReady) else None
            code = stamped.code if isinstance(stamped, RenderError) else None
            try:
                await self.journal.finish(rid, stamped.type, code, body, blobs, total)
            except Exception:
                logger.exception("journaling the terminal event of %s failed; publishing it anyway", rid)
        await self.publisher.send(stamped, reply_to=request.reply_to, blobs=blobs, body=body)

    # -- after a restart --------------------------------------------------------------

    async def resume(self) -> None:
        """Restart every accepted request that has no terminal record (after a crash)."""
        if self.journal is None:
            return
        for entry in await self.journal.unfinished():
            request = RenderRequest.model_validate_json(entry.request_json)
            frames = await self.journal.request_frames(request.request_id) if request.frames_used() else []
            active = Active(request, entry.generator, time.perf_counter(), accepted=True, frames=frames)
            self._track(active)
            try:
                admission = self.pipeline.admit(request)
            except ImageServerError as exc:  # e.g. the generator was removed from the config
                await self._publish_terminal(active, error_event(exc, request, generator=entry.generator))
                continue
            self.counters["resumed"] += 1
            logger.info("↻ %s resumed", request.request_id)
            if request.channel:
                self._supersede_channel(request)
            active.task = asyncio.create_task(self._resume_one(active, admission), name=f"render:{request.request_id}")

    async def _resume_one(self, active: Active, admission: Admission) -> None:
        if await self._ended_before_start(active):
            return
        await self._publish_accepted(active)
        await self._run(active, admission)
