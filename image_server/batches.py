"""Batches: one RenderRequest with several ``prompts`` runs as one member request per prompt.

The batch itself is a request like any other (journaled, accepted, one terminal event) whose
work is to submit its members through the same admission path as any request (so each is
journaled, accepted, rendered and answered on its own, and a repeat of a finished member is
answered from the journal) and whose terminal event is the ``BatchDone`` summary. After a
restart the batch resumes like any request: its finished members answer as repeats, its
unfinished ones were resumed on their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from schemas import BatchDone, BatchMemberOutcome, ImageReady, RenderError, RenderRequest

Terminal = ImageReady | RenderError
Submit = Callable[[RenderRequest], Awaitable[None]]


class BatchRunner:
    """Give ``observe`` every terminal event sent (the Outbox's observers): a member's ends
    its wait."""

    def __init__(self) -> None:
        # Set once the requests a previous run left are tracked again: a member must find
        # its resumed self in flight, not be admitted twice.
        self.ready = asyncio.Event()
        self._cancelled: set[str] = set()
        self._waiters: dict[str, asyncio.Future[Terminal]] = {}

    def observe(self, event: object) -> None:
        if isinstance(event, ImageReady | RenderError):
            waiter = self._waiters.pop(event.request_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(event)

    def _expect(self, request_id: str) -> asyncio.Future[Terminal]:
        future: asyncio.Future[Terminal] = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = future
        return future

    def cancel(self, batch_id: str) -> None:
        """Members not submitted yet are not submitted (those running are ended by the tracker)."""
        self._cancelled.add(batch_id)

    async def run(self, batch: RenderRequest, submit: Submit) -> BatchDone:
        """Submit each member (``submit``: as a request from the batch's sender), wait for
        their terminal events, and sum them up."""
        await self.ready.wait()
        outcomes: list[Terminal] = []
        waiters: list[asyncio.Future[Terminal]] = []
        try:
            for member in batch.batch_members():
                if batch.request_id in self._cancelled:
                    break
                # Expect first: a member refused at admission is answered before submit returns.
                waiters.append(self._expect(member.request_id))
                await submit(member)
            outcomes = list(await asyncio.gather(*waiters))
        finally:
            for member, waiter in zip(batch.batch_members(), waiters, strict=False):
                waiter.cancel()
                self._waiters.pop(member.request_id, None)
            self._cancelled.discard(batch.request_id)
        skipped = [
            RenderError(
                request_id=member.request_id,
                code="cancelled",
                message="the batch was cancelled before this member started",
                batch_id=batch.request_id,
                batch_index=member.batch_index,
            )
            for member in batch.batch_members()[len(outcomes) :]
        ]
        return summarize(batch, [*outcomes, *skipped])


def summarize(batch: RenderRequest, outcomes: Sequence[Terminal]) -> BatchDone:
    members = [
        BatchMemberOutcome(
            index=index,
            request_id=event.request_id,
            type=event.type,
            code=event.code if isinstance(event, RenderError) else None,
        )
        for index, event in enumerate(outcomes)
    ]
    costs = [event.cost for event in outcomes if isinstance(event, ImageReady)]
    known = [cost for cost in costs if cost is not None]
    return BatchDone(
        request_id=batch.request_id,
        generator=batch.generator,
        members=members,
        succeeded=sum(isinstance(event, ImageReady) for event in outcomes),
        failed=sum(isinstance(event, RenderError) for event in outcomes),
        cost=round(sum(known), 6) if known or not costs else None,
        metadata=batch.metadata,
    )
