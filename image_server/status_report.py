"""``ServiceStatus``: what a ``StatusRequest`` is answered with."""

from __future__ import annotations

import time
from collections.abc import Mapping

from image_server.frugal import FrugalPipeline
from image_server.journal import Journal
from image_server.manager import GeneratorManager
from image_server.spend.ledger import SpendLedger
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
    return ServiceStatus(
        request_id=request_id,
        default_generator=manager.default,
        generators=[_generator_status(manager, pipeline.spend.ledger, name) for name in manager.available()],
        queued=queued,
        in_flight=manager.scheduler.in_flight,
        uptime_s=uptime_s,
        counters={**counters, **pipeline.reuse.stats()},
        version=VERSION,
        journal_bytes=journal.used_bytes if journal is not None else None,
        journal_max_bytes=journal.max_bytes if journal is not None else None,
    )


def _generator_status(manager: GeneratorManager, ledger: SpendLedger, name: str) -> GeneratorStatus:
    config = manager.config(name)
    spent_today, spent_month = ledger.spent(name)
    return GeneratorStatus(
        name=name,
        strategy=config.strategy,
        in_flight=manager.scheduler.running(name),
        concurrency=config.concurrency,
        image_to_image=manager.is_image_to_image(name),
        cooling_down_until=_cooling_down_until(manager, name),
        spent_today=spent_today,
        spent_month=spent_month,
        over_budget=ledger.over_budget(name) is not None,
    )


def _cooling_down_until(manager: GeneratorManager, name: str) -> float | None:
    """When ``name``'s cool-down ends, as a wall-clock epoch (the tracker keeps monotonic time)."""
    tracker = manager.cooldowns
    until = tracker.cooling_until(name)
    return None if until is None else time.time() + (until - tracker.clock())
