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
        self._waiting: list[_Ticket] = []
        self._counter = itertools.count()
        self.held = False
        self._turn = 0  # the turn of the latest ticket started
        self._last_turn: dict[str, int] = {}  # each client's latest turn handed out

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def running(self, key: str) -> int:
        return self._running.get(key, 0)

    def queued_by_key(self) -> dict[str, int]:
        """How many waiters each key has (one pass, for metrics)."""
        counts: dict[str, int] = {}
        for ticket in self._waiting:
            counts[ticket.key] = counts.get(ticket.key, 0) + 1
        return counts

    def position(self, owner: str) -> int | None:
        """1-based place in the queue of ``owner``'s waiter, ``None`` if it is not waiting."""
        for index, ticket in enumerate(self._waiting, start=1):
            if ticket.owner == owner:
                return index
        return None

    def hold(self) -> None:
        """Start nothing more (shutdown): every waiter, now or later, gets CancelledError,
        so queued work ends unstarted while running work goes on."""
        self.held = True
        for ticket in self._waiting:
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
        self._waiting.append(ticket)
        self._waiting.sort()
        self._dispatch()
        try:
            await ticket.future
        except asyncio.CancelledError:
            if ticket.future.done() and not ticket.future.cancelled():
                # Granted just as we were cancelled: give the slot back to the next waiter.
                self._release(key)
            else:
                if ticket in self._waiting:  # _dispatch may have dropped it already
                    self._waiting.remove(ticket)
                self._dispatch()
            raise

    def _can_start(self, key: str, limit: int) -> bool:
        return self._in_flight < self.max_in_flight and self._running.get(key, 0) < limit

    def _start(self, key: str) -> None:
        self._in_flight += 1
        self._running[key] = self._running.get(key, 0) + 1

    def _release(self, key: str) -> None:
        self._in_flight -= 1
        self._running[key] -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        if self.held:
            return
        for ticket in list(self._waiting):
            if ticket.future.cancelled():
                # Its task was cancelled but has not run yet to leave the queue: granting it
                # would fail (InvalidStateError) and leak the slot.
                self._waiting.remove(ticket)
                continue
            if self._in_flight >= self.max_in_flight:
                break
            if self._can_start(ticket.key, ticket.limit):
                self._waiting.remove(ticket)
                self._start(ticket.key)
                self._turn = max(self._turn, ticket.sort_key[1])
                ticket.future.set_result(None)
        if len(self._last_turn) > 4 * len(self._waiting) + 64:
            # Clients whose turns have all come round need no memory: they start at the current turn.
            self._last_turn = {c: t for c, t in self._last_turn.items() if t > self._turn}

    def __repr__(self) -> str:
        return f"<Scheduler in_flight={self._in_flight}/{self.max_in_flight} queued={len(self._waiting)}>"
