"""How many requests each client holds, and whether it may hold one more.

The service as a whole holds at most ``max_in_flight + max_queued`` requests; one client at
most ``max_client_share`` of that (and ``max_in_flight_per_client`` where set), so one
client's flood always leaves room for the others. A client is its ``Ticket.owner``: its
CURVE key, or without CURVE its (advisory) reply_to.
"""

from __future__ import annotations

import math
from collections import Counter

from image_server.config import LimitsConfig
from image_server.errors import Overloaded


class ClientShares:
    def __init__(self, limits: LimitsConfig) -> None:
        self.limits = limits
        self.capacity = limits.max_in_flight + limits.max_queued
        share = math.ceil(limits.max_client_share * self.capacity)
        self.per_client = min(share, limits.max_in_flight_per_client or share)
        self._held: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return self._held.total()

    def held(self, owner: str) -> int:
        return self._held[owner]

    def check(self, owner: str) -> None:
        """Raise ``Overloaded`` if the service, or ``owner``'s share of it, is full."""
        if self.total >= self.capacity:
            raise Overloaded(f"service is at capacity ({self.total} requests); try again later")
        held = self._held[owner]
        if held >= self.per_client:
            raise Overloaded(
                f"client {owner or 'anonymous clients'} already has {held} requests queued or in flight, its "
                f"share of {self.per_client} (limits.max_client_share, limits.max_in_flight_per_client); "
                "wait for some to finish"
            )

    def add(self, owner: str) -> None:
        self._held[owner] += 1

    def remove(self, owner: str) -> None:
        self._held[owner] -= 1
        if self._held[owner] <= 0:
            del self._held[owner]
