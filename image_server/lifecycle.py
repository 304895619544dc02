"""The life of each request inside the service, from admission to its one terminal event.

``RequestTracker`` owns the requests in flight (keyed by request id, one task each),
admits or refuses them (capacity and each client's fair share), ends them early (cancel,
supersede, clear_queue: each only for its own client) and resumes what a previous run
left unfinished. Every ``RenderAccepted`` and terminal event goes through the ``Outbox``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from image_server.active import Active, Admission, NotAdmitted
from image_server.admission import admission_of
from image_server.batches import BatchRunner
from image_server.config import LimitsConfig, ReferencesConfig
from image_server.endings import Endings
from image_server.errors import Cancelled, ImageServerError, InvalidRequest, Superseded
from image_server.identity import Ticket, owner_key
from image_server.journal import Recorded, Recording
from image_server.outbox import Outbox, Terminal
from image_server.outcomes import error_event
from image_server.pipeline import RenderPipeline, RenderPlan
from image_server.precheck import has_embedded_references, precheck_embedded_references
from image_server.progress_relay import ProgressRelay
from image_server.shares import ClientShares
from image_server.terminal_log import note_terminal
from schemas import ImageReady, RenderError, RenderRequest

logger = logging.getLogger(__name__)
_Member = TypeVar("_Member", ImageReady, RenderError)


class RequestTracker:
    def __init__(
        self,
        pipeline: RenderPipeline,
        outbox: Outbox,
        limits: LimitsConfig,
        references: ReferencesConfig,
        counters: Counter[str],
    ) -> None:
        self.pipeline = pipeline
        self.outbox = outbox
        self.limits = limits
        self.references = references
        self.counters = counters
        self.scheduler = pipeline.manager.scheduler
        self.active: dict[str, Active] = {}
        self.endings = Endings(self.active, self.scheduler, counters)
        self.shares = ClientShares(limits)
        self._refusing: set[asyncio.Task[None]] = set()
        self.batches = BatchRunner()
        self.progress = ProgressRelay(outbox.publisher)
        outbox.observers.append(self.batches.observe)

    @property
    def queued(self) -> int:
        return len(self.active) - self.scheduler.in_flight

    def tasks(self) -> list[asyncio.Task[Any]]:
        tasks: list[asyncio.Task[Any]] = list(self._refusing)
        for active in self.active.values():
            tasks += [task for task in (active.task, active.admission) if task is not None]
        return tasks

    # -- arrival ----------------------------------------------------------------------

    async def on_render(
        self,
        request: RenderRequest,
        raw: bytes | bytearray | None = None,
        frames: Sequence[bytes | bytearray] = (),
        *,
        user_id: str | None = None,
    ) -> None:
        """Admit (or refuse) a request; ``raw`` is its JSON as received, if at hand,
        ``frames`` the message's extra frames and ``user_id`` its sender's CURVE identity."""
        rid = request.request_id
        ticket = Ticket(rid, owner_key(user_id, request.reply_to), request.reply_to)
        active = self.active.get(rid)
        if active is not None:
            if active.ticket.owner != ticket.owner:
                await self.outbox.conflict(ticket, "another client's request holds this id; this message was ignored")
            elif active.accepted:
                # Idempotency: a repeat of a request in flight only gets its acceptance again
                # (once it is journaled; until then the client's next re-send will do).
                await self.outbox.accepted(
                    active.ticket, active.generator, self._position(active), active.estimated_cost
                )
            return
        try:
            missing = sorted(index for index in request.frames_used() if index >= len(frames))
            if missing:
                raise InvalidRequest(
                    f"image frame(s) {missing} not in the message: it has {len(frames)} extra frame(s)",
                    request_id=rid,
                )
            plan = self._admit(request, ticket.owner)
            self.shares.check(ticket.owner)
        except ImageServerError as exc:
            self.counters["rejected"] += 1
            logger.info("! %s refused: %s", rid, exc.message)
            self.refuse(ticket, _in_batch(error_event(exc, request, generator=request.generator), request))
            return
        active = Active(request, ticket, plan, time.perf_counter(), raw=raw, frames=frames)
        self._track(active)
        active.task = asyncio.create_task(self._admit_and_run(active), name=f"render:{rid}")

    def refuse(self, ticket: Ticket, event: RenderError) -> None:
        """Answer a message that was not admitted. On its own task: the Outbox asks the journal
        whether the id is taken, and the receive loop must not wait for that."""
        task = asyncio.create_task(self.outbox.refuse(ticket, event), name=f"refuse:{ticket.request_id}")
        self._refusing.add(task)
        task.add_done_callback(self._refusing.discard)

    async def _admit_and_run(self, active: Active) -> None:
        """Check what is cheap, then journal the request while it starts rendering.

        A request whose id the journal surely does not hold yet (``known_ids``) does not
        wait for the journal's commit, except before anything leaves the process: a
        generator that is not in-process (a provider job, a paid call), a file written, an
        event published. Any other (a repeat, a batch) waits for the journal first.
        """
        if await self._ended_before_start(active):
            return
        request = active.request
        try:
            # Before journaling: a request whose embedded images are broken or too big must
            # not cost the disk its megabytes (only a small refusal row is kept).
            if has_embedded_references(request):
                await asyncio.to_thread(precheck_embedded_references, request, active.frames, self.references)
        except asyncio.CancelledError:
            if active.end_reason is None:
                raise
            await asyncio.shield(self._finish(active, error_event(active.end_reason, request)))
            return
        except ImageServerError as exc:
            await self._finish(active, error_event(exc, request, generator=active.generator))
            return
        # Re-serializing a request with megabytes of inline images would hold the loop
        # for tens of ms; the bytes as received say the same.
        body = active.raw if active.raw is not None else request.model_dump_json().encode()
        active.raw = None
        # Asked before the journal hears of the id: afterwards it "may know" it.
        journal = self.outbox.journal
        overlap = not request.prompts and (journal is None or journal.surely_new(request.request_id))
        # Queued for the journal's writer thread now, not when the admission task first runs
        # (after the render's first step): both go on at once.
        try:
            recording = self.outbox.record(active.ticket, active.generator, body, active.frames)
        except Exception:
            logger.exception("! %s: the journal could not take it", request.request_id)
            recording = _failed(RuntimeError("journal unavailable"))
        active.admission = asyncio.create_task(
            self._journal_and_accept(active, recording), name=f"admit:{request.request_id}"
        )
        if not overlap:
            # A batch submits its members as requests of their own, and a repeat of a
            # finished request is answered from the journal: both wait for it.
            admission = await asyncio.shield(active.admission)
            if not admission.admitted:
                await asyncio.shield(self._conclude(active, None))
                return
        active.speculating = overlap
        await self._run(active)

    async def _journal_and_accept(self, active: Active, recording: Awaitable[Recorded | None]) -> Admission:
        """Wait for the journal, then publish RenderAccepted; what happened, for the render."""
        admission = await admission_of(active, recording)
        if not admission.admitted:
            return self._not_admitted(active, admission)
        if active.end_reason is None:
            await self._accept(active)
        return admission

    def _not_admitted(self, active: Active, admission: Admission) -> Admission:
        """A render running alongside its admission stops now rather than at its next gate
        (a slow in-process render would otherwise delay the answer and hold its slot)."""
        if active.speculating and active.task is not None and not active.task.done():
            active.not_admitted = True
            active.task.cancel()
        return admission

    async def _gate(self, active: Active) -> None:
        """Wait until ``active`` is journaled; ``NotAdmitted`` if it was not."""
        if active.admission is not None and not (await asyncio.shield(active.admission)).admitted:
            raise NotAdmitted(active.request.request_id)

    async def _accept(self, active: Active) -> None:
        request = active.request
        self.counters["accepted"] += 1
        logger.info(
            "→ %s accepted for %s",
            request.request_id,
            active.generator,
            extra={"request_id": request.request_id, "generator": active.generator},
        )
        if request.clear_queue:
            self.endings.end_queued(
                active, Superseded("cleared by a request with clear_queue", request_id=request.request_id)
            )
        if request.channel:
            self.endings.supersede_channel(active)
        active.accepted = True
        await self.outbox.accepted(active.ticket, active.generator, self._position(active), active.estimated_cost)
        self.progress.accepted(active)

    def _position(self, active: Active) -> int:
        return self.scheduler.position(active.request.request_id) or 0

    def _track(self, active: Active) -> None:
        self.outbox.hold(active.ticket)
        self.active[active.request.request_id] = active
        self.shares.add(active.ticket.owner)

    def _stop_tracking(self, active: Active) -> None:
        """``active`` has its answer: no more progress, no place in flight, no early ending."""
        self.progress.stop(active)
        if self.active.get(active.request.request_id) is active:
            del self.active[active.request.request_id]
            self.shares.remove(active.ticket.owner)
        self.endings.forget(active)

    # -- ending requests early: only the client's own (endings.py) ------------------

    def cancel(self, request_id: str, *, reply_to: str | None = None, user_id: str | None = None) -> bool:
        """End ``request_id`` with ``cancelled``; False when it is not in flight or belongs to
        another client."""
        owner = owner_key(user_id, reply_to)
        active = self.active.get(request_id)
        if active is not None and active.request.prompts and active.ticket.owner == owner:
            # A batch ends with its BatchDone: cancelling it ends its members, which it sums up.
            self.batches.cancel(request_id)
            for member in [a for a in self.active.values() if a.request.batch_id == request_id]:
                self.endings.end(
                    member, Cancelled(f"batch {request_id} cancelled", request_id=member.request.request_id)
                )
            return True
        return self.endings.cancel(request_id, owner)

    async def _ended_before_start(self, active: Active) -> bool:
        """Mark the task started; if the request was ended before that, publish its end."""
        active.started = True
        if active.end_reason is None:
            return False
        await self._finish(active, error_event(active.end_reason, active.request, generator=active.generator))
        return True

    # -- running ----------------------------------------------------------------------

    async def _run(self, active: Active) -> None:
        request = active.request
        blobs: list[bytes] = []
        event: Terminal | None
        try:
            # The request joins the scheduler's queue when pipeline.run asks for a slot, that
            # is when this task first yields: report its place then, if it really waits.
            asyncio.get_running_loop().call_soon(self._report_queued, active)
            if request.prompts:
                done = await self.batches.run(request, lambda member: self._submit_member(active, member))
                await asyncio.shield(self._conclude(active, done))
                return
            outcome = await self.pipeline.run(
                request,
                active.plan,
                received_at=active.received_at,
                frames=active.frames,
                progress=lambda stage, fraction, message, position: self.progress.report(
                    active, stage, fraction, message, position
                ),
                gate=lambda: self._gate(active),
            )
            event = outcome.event
            blobs = outcome.blobs
        except NotAdmitted:
            event = None  # the admission's outcome is the answer
        except asyncio.CancelledError:
            if active.not_admitted:
                event = None  # stopped by its admission's refusal, which is the answer
            elif active.end_reason is None:
                raise  # shutdown: no terminal event is invented; the request stays unfinished
            else:
                event = error_event(active.end_reason, request, generator=active.generator)
        except ImageServerError as exc:
            event = error_event(exc, request, generator=active.generator)
        except Exception as exc:
            logger.exception("! %s failed unexpectedly", request.request_id)
            event = error_event(exc, request, generator=active.generator)
        finally:
            active.speculating = False
        await asyncio.shield(self._conclude(active, event, blobs))

    async def _conclude(self, active: Active, event: Terminal | None, blobs: Sequence[bytes] = ()) -> None:
        """End ``active`` once its admission is settled: with ``event`` if it was journaled,
        else with the refusal, or (a repeat of a finished request) with the stored event."""
        admission = Admission() if active.admission is None else await active.admission
        if admission.repeat is not None:
            self._stop_tracking(active)
            self.outbox.release(active.ticket)
            await self.outbox.replay(active.ticket, admission.repeat)
            return
        if admission.refusal is not None:
            event, blobs = admission.refusal, ()
        assert event is not None, "a render ends with an event unless its admission failed"
        await self._finish(active, event, blobs)

    def _report_queued(self, active: Active) -> None:
        position = self.scheduler.position(active.request.request_id)
        if position is not None and active.end_reason is None:
            self.progress.report(active, "queued", None, None, position)

    async def _finish(self, active: Active, event: Terminal, blobs: Sequence[bytes] = ()) -> None:
        """Stop tracking ``active``; the Outbox journals its terminal event, then sends it."""
        request = active.request
        if isinstance(event, ImageReady):
            event = _in_batch(event, request)
        elif isinstance(event, RenderError):
            event = _in_batch(event, request)
        self._stop_tracking(active)
        note_terminal(event, self.counters)
        await self.outbox.finish(active.ticket, event, blobs, resumed=active.resumed)

    # -- after a restart --------------------------------------------------------------

    async def resume(self) -> None:
        """Restart every accepted request that has no terminal record (after a crash). Their
        results wait for a subscriber (``Outbox``), so clients coming back hear them."""
        try:
            await self._resume()
        finally:
            self.batches.ready.set()  # batches may submit their members now

    async def _resume(self) -> None:
        journal = self.outbox.journal
        if journal is None:
            return
        for entry in await journal.unfinished():
            request = RenderRequest.model_validate_json(entry.request_json)
            frames = await journal.request_frames(request.request_id) if request.frames_used() else []
            ticket = Ticket(request.request_id, entry.owner or owner_key(None, request.reply_to), request.reply_to)
            try:
                plan = self._admit(request, ticket.owner)
            except ImageServerError as exc:  # e.g. the generator was removed from the config
                plan = RenderPlan([entry.generator], {}, client=ticket.owner)
                active = Active(request, ticket, plan, time.perf_counter(), accepted=True, resumed=True)
                self._track(active)
                await self._finish(active, error_event(exc, request, generator=entry.generator))
                continue
            active = Active(request, ticket, plan, time.perf_counter(), accepted=True, frames=frames, resumed=True)
            self._track(active)
            self.counters["resumed"] += 1
            logger.info("↻ %s resumed", request.request_id)
            if request.channel:
                self.endings.supersede_channel(active)
            active.task = asyncio.create_task(self._resume_one(active), name=f"render:{request.request_id}")

    async def _resume_one(self, active: Active) -> None:
        if await self._ended_before_start(active):
            return
        await self.outbox.accepted(active.ticket, active.generator, self._position(active), active.estimated_cost)
        await self._run(active)

    # -- batches ----------------------------------------------------------------------

    def _admit(self, request: RenderRequest, owner: str) -> RenderPlan:
        """A batch is admitted as its first member would be (same generator and parameters)."""
        return self.pipeline.admit(request.batch_members()[0] if request.prompts else request, client=owner)

    async def _submit_member(self, batch: Active, member: RenderRequest) -> None:
        """A member arrives as its own request from the batch's sender."""
        owner = batch.ticket.owner
        journal = self.outbox.journal
        if batch.resumed and journal is not None:
            # A member that ended before the restart (refusals included, which a new message
            # could not replay: its id is taken) answers with its stored event.
            recorded = await journal.lookup(member.request_id)
            if recorded is not None and recorded.state is Recording.FINISHED and recorded.entry.owner in (None, owner):
                await self.outbox.replay(Ticket(member.request_id, owner, member.reply_to), recorded)
                return
        user_id = owner.removeprefix("curve:") if owner.startswith("curve:") else None
        await self.on_render(member, frames=batch.frames, user_id=user_id)


def _in_batch(event: _Member, request: RenderRequest) -> _Member:
    """A member's terminal event names its batch and index."""
    if request.batch_id is None:
        return event
    return event.model_copy(update={"batch_id": request.batch_id, "batch_index": request.batch_index})


async def _failed(error: Exception) -> Recorded | None:
    raise error
