"""``ServiceStatus``: what a ``StatusRequest`` is answered with."""

from __future__ import annotations

import time
from collections.abc import Mapping

from image_server.frugal import FrugalPipeline
from image_server.journal import Journal
from image_server.manager import GeneratorManager
from image_server.version import VERSION
from schemas import GeneratorStatus, ServiceStatus


def service_status(
    manager: GeneratorManager,
    pipeline: FrugalPipeline,
    journal: Journal | None,
    *,
    request_id: str | None,
    queued: int,
    uptime_s: float,
    counters: Mapping[str, int],
) -> ServiceStatus:
    """The generators (load, cool-down, spend), the queue, the counters and the journal's size."""
    scheduler = manager.scheduler
    ledger = pipeline.spend.ledger
    generators = [
        GeneratorStatus(
            name=name,
            strategy=manager.config(name).strategy,
            in_flight=scheduler.running(name),
            concurrency=manager.config(name).concurrency,
            image_to_image=manager.is_image_to_image(name),
            cooling_down_until=_cooling_down_until(manager, name),
            spent_today=ledger.spent(name)[0],
            spent_month=ledger.spent(name)[1],
            over_budget=ledger.over_budget(name) is not None,
        )
        for name in manager.available()
    ]
    return ServiceStatus(
        request_id=request_id,
        default_generator=manager.default,
        generators=generators,
        queued=queued,
        in_flight=scheduler.in_flight,
        uptime_s=uptime_s,
        counters={**counters, **pipeline.reuse.stats()},
        version=VERSION,
        journal_bytes=journal.used_bytes if journal is not None else None,
        journal_max_bytes=journal.max_bytes if journal is not None else None,
    )


def _cooling_down_until(manager: GeneratorManager, name: str) -> float | None:
    """When ``name``'s cool-down ends, as a wall-clock epoch (the tracker keeps monotonic time)."""
    tracker = manager.cooldowns
    until = tracker.cooling_until(name)
    return None if until is None else time.time() + (until - tracker.clock())
