"""Liveness, readiness and the live levels behind /metrics, read from a running service.

Liveness is only "the loop answers in time". Readiness is what a load balancer or a
supervisor needs before sending work: sockets up, journal and output dir writable, the
default generator usable. Each check names what failed, so the body of /readyz says why.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from image_server.errors import ImageServerError
from image_server.frugal import FrugalPipeline
from image_server.generators.registry import get_generator_class
from image_server.journal import Journal
from image_server.looplag import LoopLagMonitor
from image_server.metrics import LiveState, ServiceMetrics
from image_server.pipeline import RenderPipeline
from image_server.writable import writable_problem


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = "ok"


class ServiceProbe:
    def __init__(
        self,
        *,
        serving: Callable[[], bool],
        pipeline: RenderPipeline,
        journal: Journal | None,
        output_dir: Path,
        counters: Counter[str],
        lag: LoopLagMonitor,
        max_loop_lag_s: float,
        metrics: ServiceMetrics,
    ) -> None:
        self.serving = serving
        self.pipeline = pipeline
        self.manager = pipeline.manager
        self.journal = journal
        self.output_dir = output_dir
        self.counters = counters
        self.lag = lag
        self.max_loop_lag_s = max_loop_lag_s
        self.metrics = metrics

    def liveness(self) -> Check:
        lag = self.lag.lag_s
        if lag > self.max_loop_lag_s:
            return Check("event_loop", False, f"event loop lag {lag:.3f}s over {self.max_loop_lag_s:g}s")
        return Check("event_loop", True, f"lag {lag:.3f}s")

    async def readiness(self) -> list[Check]:
        checks = [Check("sockets", self.serving(), "bound" if self.serving() else "not serving (starting or stopping)")]
        if self.journal is not None:
            problem = await asyncio.to_thread(writable_problem, self.journal.path.parent)
            checks.append(Check("journal", problem is None, problem or "writable"))
        problem = await asyncio.to_thread(writable_problem, self.output_dir)
        checks.append(Check("output_dir", problem is None, problem or "writable"))
        checks.append(self._default_generator())
        return checks

    def _default_generator(self) -> Check:
        name = self.manager.default
        try:
            get_generator_class(self.manager.config(name).strategy)
        except ImageServerError as exc:
            return Check("default_generator", False, f"{name}: {exc.message}")
        until = self.pipeline.cooldowns.cooling_until(name)
        if until is not None:
            left = until - self.pipeline.cooldowns.clock()
            return Check("default_generator", False, f"{name} is cooling down for {left:.0f}s more")
        return Check("default_generator", True, f"{name} usable")

    async def refresh_metrics(self) -> bytes:
        """Read the live levels, then render the registry in the Prometheus text format."""
        scheduler = self.manager.scheduler
        names = self.manager.available()
        waiting = scheduler.queued_by_key()
        rows = unfinished = 0
        size = 0
        if self.journal is not None:
            rows, unfinished = await self.journal.stats()
            size = await asyncio.to_thread(self.journal.size_bytes)
        spent = {}
        over: dict[str, bool] = {}
        cache: dict[str, int] = {}
        if isinstance(self.pipeline, FrugalPipeline):
            ledger = self.pipeline.spend.ledger
            spent = {name: ledger.spent(name) for name in names}
            over = {name: ledger.over_budget(name) is not None for name in names}
            cache = self.pipeline.reuse.stats()
        self.metrics.live = LiveState(
            queued={name: waiting.get(name, 0) for name in names},
            in_flight={name: scheduler.running(name) for name in names},
            cooling_down={name: self.pipeline.cooldowns.cooling_until(name) is not None for name in names},
            journal_bytes=size,
            journal_rows=rows,
            journal_unfinished=unfinished,
            loop_lag_s=self.lag.take_worst(),
            counters=dict(self.counters),
            spent_today={name: pair[0] for name, pair in spent.items()},
            spent_month={name: pair[1] for name, pair in spent.items()},
            over_budget=over,
            cache=cache,
        )
        return self.metrics.exposition()
