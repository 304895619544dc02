"""How late the event loop answers: a timer's overshoot, measured continuously.

A loop held by blocking work answers nothing (HTTP included) until it is free; this shows how
long such stalls are, for /healthz and the ``image_server_event_loop_lag_seconds`` gauge.
"""

from __future__ import annotations

import asyncio


class LoopLagMonitor:
    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.lag_s = 0.0  # the latest overshoot
        self.worst_s = 0.0  # the worst since the last ``take_worst()``

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self.interval_s)
            self.lag_s = max(0.0, loop.time() - started - self.interval_s)
            self.worst_s = max(self.worst_s, self.lag_s)

    def take_worst(self) -> float:
        """The worst lag since the last call (so a short stall between scrapes still shows)."""
        worst, self.worst_s = max(self.worst_s, self.lag_s), 0.0
        return worst
