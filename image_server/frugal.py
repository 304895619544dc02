"""The render pipeline with its spend-and-reuse layer: prices and budgets, the result cache
and coalescing around ``RenderPipeline``'s render.

``admit`` adds the spend checks (nothing is spent yet) and the estimate for
``RenderAccepted``; ``run`` reserves the estimate, answers from the cache or an identical
render in flight where the request allows it, else renders, then charges the actual cost
and says it in ``ImageReady.cost``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from image_server.cache.keys import cache_key
from image_server.cache.reuse import ResultReuse
from image_server.cache.settings import CacheConfig
from image_server.config import ReferencesConfig
from image_server.errors import ImageServerError
from image_server.generators.base import check_request
from image_server.manager import GeneratorManager
from image_server.pipeline import (
    Gate,
    ProgressSink,
    RenderOutcome,
    RenderPipeline,
    RenderPlan,
    _ignore_progress,
    _open_gate,
)
from image_server.prompting.policy import PromptPlan, PromptPolicy
from image_server.spend.guard import SpendGuard
from image_server.spend.hedging import HedgeConfig, LatencyTracker, race
from image_server.storage import OutputStore
from schemas import ImageReady, RenderRequest

# Hash reference bytes for a cache key on a thread past this many bytes.
HASH_IN_THREAD_BYTES = 256 * 1024


@dataclass
class FrugalPlan(RenderPlan):
    estimated_cost: float | None = None
    prompt_plan: PromptPlan | None = None
    hedge: str | None = None  # the generator to race against the first after its p95


class FrugalPipeline(RenderPipeline):
    def __init__(
        self,
        manager: GeneratorManager,
        store: OutputStore,
        references: ReferencesConfig,
        *,
        spend: SpendGuard,
        reuse: ResultReuse,
        cache: CacheConfig,
        prompts: PromptPolicy,
        hedging: dict[str, HedgeConfig] | None = None,
        default_project: str = "default",
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(
            manager,
            store,
            references,
            default_project=default_project,
            http_client=http_client,
        )
        self.spend = spend
        self.reuse = reuse
        self.cache = cache
        self.prompts = prompts
        self.hedging = hedging or {}
        self.latency = LatencyTracker()

    def admit(self, request: RenderRequest, *, client: str = "") -> FrugalPlan:
        primary = self.manager.resolve(request.generator)
        plan = self.prompts.plan(request, primary, self.manager.capabilities(primary).max_prompt_chars)
        base = super().admit(request if plan is None else self.prompts.checked_prompt(request, plan), client=client)
        chain, estimated = self.spend.admit(request, base.chain)
        hedge = self._hedge_for(request, chain[0], estimated, base.ignored)
        configs = {name: base.configs[name] for name in chain}
        return FrugalPlan(chain, base.ignored, configs, client, estimated_cost=estimated, prompt_plan=plan, hedge=hedge)

    def _hedge_plan(self, plan: RenderPlan, hedge: str) -> RenderPlan:
        """The hedge generator alone, with its own config (the request's overrides are not for it)."""
        return RenderPlan([hedge], plan.ignored, {hedge: self.manager.config(hedge)}, plan.client)

    def _hedge_for(
        self, request: RenderRequest, primary: str, estimated: float | None, ignored: dict[str, list[str]]
    ) -> str | None:
        """The hedge generator for this request, if it has one that can serve it within max_cost."""
        config = self.hedging.get(primary)
        if config is None:
            return None
        try:
            ignored[config.hedge] = check_request(self.manager.capabilities(config.hedge), request, config.hedge)
        except ImageServerError:
            return None
        if request.max_cost is not None:
            hedge_cost = self.spend.estimate(config.hedge, request)
            if estimated is None or hedge_cost is None or estimated + hedge_cost > request.max_cost:
                return None  # both together could cost more than the user allowed
        return config.hedge

    async def run(
        self,
        request: RenderRequest,
        admission: RenderPlan,
        *,
        received_at: float | None = None,
        progress: ProgressSink = _ignore_progress,
        frames: Sequence[bytes | bytearray] = (),
        gate: Gate = _open_gate,
    ) -> RenderOutcome:
        received = time.perf_counter() if received_at is None else received_at

        plan = admission.prompt_plan if isinstance(admission, FrugalPlan) else None

        async def render() -> tuple[ImageReady, list[bytes]]:
            sent, prompt_applied = (request, {}) if plan is None else await self.prompts.apply(request, plan)

            async def on(chosen: RenderPlan, asked: RenderRequest) -> RenderOutcome:
                return await RenderPipeline.run(
                    self, asked, chosen, received_at=received, progress=progress, frames=frames, gate=gate
                )

            outcome = await self._maybe_hedged(sent, admission, on)
            event = outcome.event
            if prompt_applied:
                event = event.model_copy(update={"applied": {**event.applied, **prompt_applied}})
            return event, outcome.blobs

        reservation = self.spend.reserve(request, admission.generator)
        try:
            key = await self._key(request, admission, frames) if self._wants_cache(request, admission) else None
            if key is not None or plan is not None:
                # The cache writes files and answers others; a prompt policy may call a paid model.
                await gate()
            if key is None:
                event, blobs = await render()
            else:
                event, blobs = await self.reuse.answer(request, key, render, received_at=received)
            reused = event.cached_from is not None
            cost = self.spend.settle(reservation, request, None if reused else event)
            hedge = event.applied.get("hedge") if not reused else None
            if isinstance(hedge, dict) and hedge.get("loser_cost"):
                # The loser was cancelled, but a provider may well have billed it.
                self.spend.ledger.charge(hedge["loser"], hedge["loser_cost"])
                cost = (cost or 0.0) + hedge["loser_cost"]
        finally:
            self.spend.ledger.release(reservation)
        if cost:
            await self.spend.ledger.save()
        return RenderOutcome(event.model_copy(update={"cost": 0.0 if reused else cost}), blobs)

    async def _maybe_hedged(
        self,
        request: RenderRequest,
        admission: RenderPlan,
        on: Callable[[RenderPlan, RenderRequest], Awaitable[RenderOutcome]],
    ) -> RenderOutcome:
        """Render on the chain; past the primary's p95, race the hedge generator against it."""
        primary = admission.generator
        hedge = admission.hedge if isinstance(admission, FrugalPlan) else None
        config = self.hedging.get(primary)
        after = None if hedge is None or config is None else self.latency.hedge_after(primary, config)
        window = config.window if config is not None else 200
        started = time.perf_counter()
        if hedge is None or after is None or self.spend.ledger.over_budget(hedge, self._cost(hedge, request)):
            outcome = await on(admission, request)
            self.latency.record(primary, time.perf_counter() - started, window)
            return outcome
        # The request's generator_config is for its own generator, not the hedge.
        for_hedge = request.model_copy(update={"generator_config": {}})
        raced = await race(
            lambda: on(admission, request), lambda: on(self._hedge_plan(admission, hedge), for_hedge), after
        )
        outcome = raced.value
        # When the hedge won, the primary was still running: it took at least this long.
        self.latency.record(primary, time.perf_counter() - started, window)
        if not raced.hedged:
            return outcome
        loser = primary if raced.hedge_won else hedge
        detail = {"after_s": round(after, 3), "winner": outcome.event.generator, "loser": loser}
        detail["loser_cost"] = self._cost(loser, request)
        applied = {**outcome.event.applied, "hedge": detail}
        return RenderOutcome(outcome.event.model_copy(update={"applied": applied}), outcome.blobs)

    def _cost(self, generator: str, request: RenderRequest) -> float:
        return self.spend.estimate(generator, request) or 0.0

    def _wants_cache(self, request: RenderRequest, admission: RenderPlan) -> bool:
        if request.cache is not None:
            return request.cache
        return admission.generator in self.cache.default_on

    async def _key(
        self, request: RenderRequest, admission: RenderPlan, frames: Sequence[bytes | bytearray]
    ) -> str | None:
        # The configs the plan resolved once at admission (the request's overrides applied).
        configs: dict[str, Any] = {name: admission.configs[name].model_dump(mode="json") for name in admission.chain}
        if sum(len(frame) for frame in frames) > HASH_IN_THREAD_BYTES:
            return await asyncio.to_thread(cache_key, request, configs, frames)
        return cache_key(request, configs, frames)
