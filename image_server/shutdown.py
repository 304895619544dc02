"""Shutdown: drain what runs, start nothing queued, and say what was left (as arq does).

Queued requests are not started once the service is stopping: they stay in the journal for
the next start (with a paid provider, a render started during shutdown costs money and may
be cut off anyway). A second signal stops the running ones too.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from image_server.lifecycle import RequestTracker
from image_server.metrics import ServiceMetrics

logger = logging.getLogger(__name__)


async def drain(requests: RequestTracker, timeout_s: float, stop_now: asyncio.Event) -> None:
    """Wait up to ``timeout_s`` (or until ``stop_now``) for running renders; cancel the rest,
    which stay unfinished in the journal (no terminal event is invented)."""
    requests.scheduler.hold()
    pending = set(requests.tasks())
    if not pending:
        return
    loop = asyncio.get_running_loop()
    running = requests.scheduler.in_flight
    if running:
        logger.info("draining %d running request(s) for up to %.1fs; a second signal stops at once", running, timeout_s)
    deadline = loop.time() + timeout_s
    interrupt = asyncio.ensure_future(stop_now.wait())
    try:
        while pending and not stop_now.is_set():
            left = deadline - loop.time()
            if left <= 0:
                break
            done, _ = await asyncio.wait({*pending, interrupt}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            pending -= done
    finally:
        interrupt.cancel()
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


@dataclass(frozen=True)
class ShutdownSummary:
    completed: int
    failed: dict[str, int]
    left: int

    @classmethod
    def of(cls, requests: RequestTracker, metrics: ServiceMetrics) -> ShutdownSummary:
        failed = {code: n for code, n in sorted(metrics.outcomes.items()) if code != "ok"}
        left = sum(1 for active in requests.active.values() if active.accepted)
        return cls(metrics.outcomes["ok"], failed, left)

    def __str__(self) -> str:
        failed = sum(self.failed.values())
        by_code = ", ".join(f"{code} {n}" for code, n in self.failed.items())
        return (
            f"shutdown summary: {self.completed} completed, {failed} failed"
            + (f" ({by_code})" if by_code else "")
            + f", {self.left} left in the journal for the next start"
        )
