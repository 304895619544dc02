"""Detect lost events from each service's monotonically increasing ``seq``.

Only a subscriber that receives *every* event of a service (a monitor subscribed to all
topics) can tell a gap from a filter; ``RenderClient(monitor=True)`` is one.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SeqTracker:
    missed: int = 0  # events known to be lost, over all services
    restarts: int = 0  # a service's seq went back: it restarted and counts from 1 again
    _last: dict[str, int] = field(default_factory=dict)

    def observe(self, service_id: str, seq: int) -> int:
        """Record one event; returns how many events were missed just before it."""
        last = self._last.get(service_id)
        self._last[service_id] = seq
        if last is None:
            return 0
        if seq <= last:
            self.restarts += 1
            return 0
        gap = seq - last - 1
        self.missed += gap
        return gap
