"""Admission of queued work: a global in-flight bound, per-key limits and priorities.

One scheduler hands out slots so that a request for a busy generator never holds a
global slot while it waits for its own generator (which would starve the others).
Waiters start highest ``priority`` first; at equal priority, clients take turns (start-time
fair queueing: a client's n-th waiting request goes after every other client's earlier
turns), then first in, first out. So one client's flood does not delay another's request
by the length of the flood. The queue bound is the service's to enforce, before it
accepts a request.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass(order=True)
class _Ticket:
    sort_key: tuple[int, int, int]
    key: str = field(compare=False)
    owner: str = field(compare=False)
    limit: int = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)


class Scheduler:
    """``async with scheduler.slot(key, limit, priority):`` runs once a slot is free."""

    def __init__(self, *, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self._running: dict[str, int] = {}
        self._in_flight = 0
        # Waiters per key, each list in start order. Only a key's first waiter can be next
        # for that key, so a release looks at one waiter per key, not at the whole queue
        # (a burst of 200 on one generator made every release scan all of them).
        self._queues: dict[str, list[_Ticket]] = {}
        self._by_owner: dict[str, list[_Ticket]] = {}  # a hedged request waits twice
        self._queued = 0
        self._counter = itertools.count()
        self.held = False
        self._turn = 0  # the turn of the latest ticket started
        self._last_turn: dict[str, int] = {}  # each client's latest turn handed out

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return self._queued

    def running(self, key: str) -> int:
        return self._running.get(key, 0)

    def queued_by_key(self) -> dict[str, int]:
        """How many waiters each key has (for metrics)."""
        return {key: len(queue) for key, queue in self._queues.items() if queue}

    def position(self, owner: str) -> int | None:
        """1-based place in the queue of ``owner``'s waiter, ``None`` if it is not waiting."""
        tickets = self._by_owner.get(owner)
        if not tickets:
            return None
        first = min(tickets)
        return 1 + sum(bisect.bisect_left(queue, first) for queue in self._queues.values())

    def hold(self) -> None:
        """Start nothing more (shutdown): every waiter, now or later, gets CancelledError,
        so queued work ends unstarted while running work goes on."""
        self.held = True
        for queue in self._queues.values():
            for ticket in queue:
                ticket.future.cancel()

    @asynccontextmanager
    async def slot(
        self, key: str, limit: int, priority: int = 0, *, owner: str = "", client: str = ""
    ) -> AsyncIterator[None]:
        await self._acquire(key, limit, priority, owner, client)
        try:
            yield
        finally:
            self._release(key)

    async def _acquire(self, key: str, limit: int, priority: int, owner: str, client: str) -> None:
        if self.held:
            raise asyncio.CancelledError("the scheduler starts nothing more (shutting down)")
        turn = max(self._last_turn.get(client, 0), self._turn) + 1
        self._last_turn[client] = turn
        ticket = _Ticket(
            (-priority, turn, next(self._counter)), key, owner, limit, asyncio.get_running_loop().create_future()
        )
        if self._can_start(key, limit) and not self._queues.get(key):
            # Nothing of this key waits and it has room: no queue to join.
            self._start(ticket)
            return
        self._enqueue(ticket)
        self._dispatch()
        try:
            await ticket.future
        except asyncio.CancelledError:
            if ticket.future.done() and not ticket.future.cancelled():
                # Granted just as we were cancelled: give the slot back to the next waiter.
                self._release(key)
            else:
                self._dequeue(ticket)
                self._dispatch()
            raise

    def _enqueue(self, ticket: _Ticket) -> None:
        bisect.insort(self._queues.setdefault(ticket.key, []), ticket)
        if ticket.owner:
            self._by_owner.setdefault(ticket.owner, []).append(ticket)
        self._queued += 1

    def _dequeue(self, ticket: _Ticket) -> None:
        queue = self._queues.get(ticket.key, [])
        index = bisect.bisect_left(queue, ticket)
        if index < len(queue) and queue[index] is ticket:  # _dispatch may have dropped it already
            del queue[index]
            self._queued -= 1
            same_owner = self._by_owner.get(ticket.owner, [])
            if ticket in same_owner:
                same_owner.remove(ticket)
                if not same_owner:
                    del self._by_owner[ticket.owner]

    def _can_start(self, key: str, limit: int) -> bool:
        return self._in_flight < self.max_in_flight and self._running.get(key, 0) < limit

    def _start(self, ticket: _Ticket) -> None:
        self._in_flight += 1
        self._running[ticket.key] = self._running.get(ticket.key, 0) + 1
        self._turn = max(self._turn, ticket.sort_key[1])

    def _release(self, key: str) -> None:
        self._in_flight -= 1
        self._running[key] -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        """Start waiters while there is room: each time the first in order among the keys
        whose own limit allows one more (equal to walking the whole queue in order)."""
        if self.held:
            return
        while self._in_flight < self.max_in_flight:
            best: _Ticket | None = None
            for key, queue in self._queues.items():
                while queue and queue[0].future.cancelled():
                    # Its task was cancelled but has not run yet to leave the queue: granting
                    # it would fail (InvalidStateError) and leak the slot.
                    self._dequeue(queue[0])
                if queue and self._running.get(key, 0) < queue[0].limit and (best is None or queue[0] < best):
                    best = queue[0]
            if best is None:
                break
            self._dequeue(best)
            self._start(best)
            best.future.set_result(None)
        if len(self._last_turn) > 4 * self._queued + 64:
            # Clients whose turns have all come round need no memory: they start at the current turn.
            self._last_turn = {c: t for c, t in self._last_turn.items() if t > self._turn}

    def __repr__(self) -> str:
        return f"<Scheduler in_flight={self._in_flight}/{self.max_in_flight} queued={self._queued}>"
