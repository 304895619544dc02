"""Hedged requests: when a render runs past its generator's p95, start it on a hedge generator
too; the first result wins and the other is cancelled (its cost is still counted).

Off unless ``[hedging.<generator>]`` names a hedge. The p95 is measured over the
generator's recent successful renders once there are ``min_samples`` of them, or taken from
``after_s`` until then (no hedging before either is known).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class HedgeConfig(BaseModel):
    """``[hedging.<generator>]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hedge: str  # the generator to race against this one
    after_s: float | None = Field(default=None, gt=0)  # until enough renders are measured; None: wait for them
    percentile: float = Field(default=0.95, gt=0, lt=1)
    min_samples: int = Field(default=20, ge=1)
    window: int = Field(default=200, ge=1)  # recent renders the percentile is taken over


class LatencyTracker:
    """Recent successful render durations per generator."""

    def __init__(self) -> None:
        self._samples: dict[str, deque[float]] = {}

    def record(self, generator: str, seconds: float, window: int = 200) -> None:
        samples = self._samples.get(generator)
        if samples is None or samples.maxlen != window:
            samples = self._samples[generator] = deque(samples or (), maxlen=window)
        samples.append(seconds)

    def percentile(self, generator: str, q: float, min_samples: int) -> float | None:
        samples = self._samples.get(generator)
        if not samples or len(samples) < min_samples:
            return None
        ordered = sorted(samples)
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

    def hedge_after(self, generator: str, config: HedgeConfig) -> float | None:
        """Seconds to wait before hedging a render on ``generator``; None: do not hedge yet."""
        measured = self.percentile(generator, config.percentile, config.min_samples)
        return measured if measured is not None else config.after_s


class Raced(Generic[T]):
    def __init__(self, value: T, hedged: bool, hedge_won: bool) -> None:
        self.value = value
        self.hedged = hedged  # the hedge was started
        self.hedge_won = hedge_won


async def race(primary: Callable[[], Awaitable[T]], hedge: Callable[[], Awaitable[T]], after_s: float) -> Raced[T]:
    """Run ``primary``; if it has not finished after ``after_s``, run ``hedge`` alongside.
    The first to succeed wins and the other is cancelled; when both fail, the primary's
    error is raised."""
    first = asyncio.ensure_future(primary())
    try:
        started, _ = await asyncio.wait({first}, timeout=after_s)
    except asyncio.CancelledError:
        await _cancel(first)
        raise
    if started:
        return Raced(first.result(), hedged=False, hedge_won=False)
    second = asyncio.ensure_future(hedge())
    pending: set[asyncio.Future[T]] = {first, second}
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is None:
                    await _cancel(*pending)
                    return Raced(task.result(), hedged=True, hedge_won=task is second)
        first.result()  # both failed: the primary's error
        raise AssertionError("unreachable")
    finally:
        await _cancel(first, second)


async def _cancel(*tasks: asyncio.Future[T]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
