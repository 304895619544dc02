"""The Outbox: the one way ``RenderAccepted`` and terminal events leave the service.

The rule it keeps: one terminal event per request id, ever, and only for the request that
holds the id. A request holds its id from admission (``hold``) until its terminal event is
recorded; ``finish`` journals that event first, then sends it, and only for the holder.
A refusal (a request never admitted) is journaled as the id's terminal event too, unless
the id is already held or known: then the message conflicts, and its sender hears so
through a ``RequestConflict``, which ends nothing. A valid repeat of a finished request
from its own sender gets the stored event again (the same event, not a second one).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

from image_server.audience import Audience
from image_server.identity import Ticket
from image_server.journal import Journal, QuotaExceeded, Recorded, Recording
from image_server.publisher import EventPublisher
from schemas import MESSAGE_ADAPTER, BatchDone, ImageReady, RenderAccepted, RenderError, RequestConflict, event_topic

logger = logging.getLogger(__name__)

Terminal = ImageReady | RenderError | BatchDone  # BatchDone: a batch's own terminal event


class Outbox:
    def __init__(
        self,
        publisher: EventPublisher,
        journal: Journal | None,
        counters: Counter[str],
        *,
        audience: Audience | None = None,
        resume_grace_s: float = 5.0,
    ) -> None:
        self.publisher = publisher
        self.journal = journal
        self.counters = counters
        self.audience = audience or Audience()
        self.resume_grace_s = resume_grace_s
        self._held: dict[str, Ticket] = {}
        # Told of every terminal event sent (new, refused or replayed): batches wait on their members.
        self.observers: list[Callable[[Terminal], None]] = []

    # -- holding ids ------------------------------------------------------------------

    def hold(self, ticket: Ticket) -> bool:
        """Make ``ticket`` the holder of its id; False if another holds it."""
        holder = self._held.setdefault(ticket.request_id, ticket)
        return holder is ticket

    def holder(self, request_id: str) -> Ticket | None:
        return self._held.get(request_id)

    def release(self, ticket: Ticket) -> None:
        """Give up the id without a terminal event (the journal could not take the request,
        or a repeat of a finished one was answered)."""
        if self._held.get(ticket.request_id) is ticket:
            del self._held[ticket.request_id]

    def record(
        self, ticket: Ticket, generator: str, body: bytes | bytearray, frames: Sequence[bytes | bytearray]
    ) -> Awaitable[Recorded | None]:
        """Journal the held request before anything is said about it (``None``: no journal).
        The journal has the write queued when this returns; await the answer."""
        if self.journal is None:
            return _nothing()
        return self.journal.admit_soon(ticket.request_id, generator, body, frames, owner=ticket.owner)

    # -- events -----------------------------------------------------------------------

    async def accepted(
        self, ticket: Ticket, generator: str, queue_position: int, estimated_cost: float | None = None
    ) -> None:
        if self._held.get(ticket.request_id) is not ticket:
            logger.error("RenderAccepted for %s withheld: it is not the request holding the id", ticket.request_id)
            return
        event = RenderAccepted(
            request_id=ticket.request_id,
            generator=generator,
            queue_position=queue_position,
            estimated_cost=estimated_cost,
        )
        await self.publisher.send(self.publisher.stamp(event), reply_to=ticket.reply_to)

    async def finish(
        self, ticket: Ticket, event: Terminal, blobs: Sequence[bytes] = (), *, resumed: bool = False
    ) -> bool:
        """Journal ``event`` as the id's terminal event, then send it; False (and nothing
        sent) when ``ticket`` does not hold the id or the journal already has its event."""
        rid = ticket.request_id
        if self._held.get(rid) is not ticket:
            self.counters["terminal_withheld"] += 1
            logger.error("terminal event for %s withheld: it is not the request holding the id", rid)
            return False
        del self._held[rid]
        stamped = self.publisher.stamp(event)
        body = stamped.model_dump_json().encode()  # once: journaled and published as the same bytes
        if not await self._journal_terminal(ticket, stamped, body, blobs, force=True):
            return False
        if resumed:
            await self._wait_for_audience(ticket, stamped)
        await self.publisher.send(stamped, reply_to=ticket.reply_to, blobs=blobs, body=body)
        self._observe(stamped)
        return True

    async def refuse(self, ticket: Ticket, event: RenderError) -> None:
        """The terminal event of a request that was never admitted, unless its id is taken."""
        rid = ticket.request_id
        if rid in self._held:
            await self.conflict(ticket, "a request with this id is in flight; this message was ignored")
            return
        stamped = self.publisher.stamp(event)
        body = stamped.model_dump_json().encode()
        if await self._journal_terminal(ticket, stamped, body, (), force=False):
            await self.publisher.send(stamped, reply_to=ticket.reply_to, body=body)
            self._observe(stamped)

    async def replay(self, ticket: Ticket, recorded: Recorded) -> None:
        """Answer a repeat of a finished request: its stored event to its own sender only."""
        entry = recorded.entry
        if entry.owner not in (None, ticket.owner):
            await self.conflict(ticket, "this id belongs to another client's request; this message was ignored")
            return
        self.counters["repeated"] += 1
        stored = MESSAGE_ADAPTER.validate_json(entry.terminal or "")
        await self.publisher.send(self.publisher.stamp(stored), reply_to=ticket.reply_to, blobs=recorded.blobs)
        self._observe(stored)

    def _observe(self, event: Terminal) -> None:
        for observer in self.observers:
            try:
                observer(event)
            except Exception:  # an observer's bug must not undo a sent event
                logger.exception("terminal-event observer failed for %s", event.request_id)

    async def conflict(self, ticket: Ticket, reason: str) -> None:
        """Tell the sender its message named an id it cannot use; no terminal event."""
        self.counters["conflicts"] += 1
        logger.warning("conflict on %s (from %s): %s", ticket.request_id, ticket.owner or "anonymous", reason)
        notice = RequestConflict(request_id=ticket.request_id, message=reason)
        await self.publisher.send(self.publisher.stamp(notice), reply_to=ticket.reply_to)

    # -- helpers ----------------------------------------------------------------------

    async def _journal_terminal(
        self, ticket: Ticket, event: Terminal, body: bytes, blobs: Sequence[bytes], *, force: bool
    ) -> bool:
        """Record ``event``; True when it is the id's terminal event and may be sent.

        ``force``: the request was admitted, so a journal failure must not strand it (its
        event goes out unrecorded, with an error in the log); a refusal is not sent then.
        """
        if self.journal is None:
            return True
        total = event.timings.total if isinstance(event, ImageReady) else None
        code = event.code if isinstance(event, RenderError) else None
        try:
            recorded = await self.journal.finish(
                ticket.request_id,
                event.type,
                code,
                body,
                blobs,
                total,
                generator=event.generator or "",
                owner=ticket.owner,
            )
        except QuotaExceeded as exc:
            # Nothing new fits: a refusal goes out unrecorded rather than not at all.
            logger.warning("%s: %s; its terminal event is not journaled", ticket.request_id, exc)
            return True
        except Exception:
            logger.exception("journaling the terminal event of %s failed", ticket.request_id)
            return force
        if recorded.state is Recording.NEW:
            return True
        if force and recorded.state is Recording.FINISHED:
            # A request ended before it was journaled (cancelled right away) whose id had
            # finished before: it was a repeat, and the stored event is its answer.
            self.counters["terminal_withheld"] += 1
            logger.warning("%s already had a terminal event; that one is sent again", ticket.request_id)
            await self.replay(ticket, recorded)
        else:
            await self.conflict(ticket, "this id belongs to another request; this message was ignored")
        return False

    async def _wait_for_audience(self, ticket: Ticket, event: Terminal) -> None:
        topic = event_topic(event.type, ticket.reply_to).encode("ascii")
        if not await self.audience.heard(topic, self.resume_grace_s):
            logger.info(
                "%s: no subscriber to %r after %.1fs; publishing anyway", ticket.request_id, topic, self.resume_grace_s
            )

    def __repr__(self) -> str:
        return f"<Outbox held={len(self._held)} journal={'on' if self.journal is not None else 'off'}>"


async def _nothing() -> None:
    return None
