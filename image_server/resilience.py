"""Retries with backoff, fallback chains and cool-downs around single generator attempts.

Retryable failures (connection errors, 5xx, 429, timeouts) are retried with exponential
backoff and jitter, waiting at least a provider's ``Retry-After``; non-retryable ones (bad
request, auth, content policy) are not. When a generator gives up, the next one in the
chain is tried. A generator that fails ``cooldown_after`` times in a row is skipped for
``cooldown_s``, then tried again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from image_server.errors import ContentPolicy, GenerationFailed, GeneratorError, ImageServerError, Unsupported
from image_server.generators.base import GeneratorConfig

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
T = TypeVar("T")
# One shared generator for backoff jitter: seeding a new Random() reads os.urandom and cost
# about 9 us on every request (benchmarks/README.md, service overhead).
_JITTER_RNG = random.Random()


@dataclass
class CooldownTracker:
    """Consecutive failures per generator and when each may be tried again."""

    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, int] = field(default_factory=dict)
    _until: dict[str, float] = field(default_factory=dict)

    def cooling_until(self, name: str) -> float | None:
        """Monotonic time until which ``name`` is skipped, or None when it may be used."""
        until = self._until.get(name)
        if until is not None and until <= self.clock():
            del self._until[name]  # cool-down over: half-open, the next attempt decides
            return None
        return until

    def record_success(self, name: str) -> None:
        self._failures.pop(name, None)
        self._until.pop(name, None)

    def record_failure(self, name: str, config: GeneratorConfig) -> None:
        count = self._failures.get(name, 0) + 1
        self._failures[name] = count
        if count >= config.cooldown_after and config.cooldown_s > 0:
            self._until[name] = self.clock() + config.cooldown_s
            self._failures[name] = 0
            logger.warning(
                "generator %s failed %d times in a row; cooling down for %.0fs", name, count, config.cooldown_s
            )


def backoff_delay(attempt: int, base_s: float, retry_after: float | None, rng: random.Random) -> float:
    """Exponential backoff with jitter (x0.5..1.5), never shorter than the provider's Retry-After."""
    delay: float = min(MAX_BACKOFF_S, base_s * 2.0 ** (attempt - 1)) * rng.uniform(0.5, 1.5)
    return max(delay, retry_after or 0.0)


def counts_against_generator(exc: ImageServerError) -> bool:
    """Failures that say something about the generator's health (not about the request)."""
    return (
        isinstance(exc, GeneratorError)
        and not isinstance(exc, ContentPolicy | Unsupported)
        and (exc.retryable or not isinstance(exc, GenerationFailed) or exc.status in (None, 401, 403))
    )


@dataclass
class ChainResult(Generic[T]):
    generator: str
    value: T
    attempts: int


async def run_chain(
    chain: Sequence[str],
    attempt: Callable[[str, int], Awaitable[T]],
    *,
    config_for: Callable[[str], GeneratorConfig],
    cooldowns: CooldownTracker,
    rng: random.Random | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> ChainResult[T]:
    """Run ``attempt(name, attempt_number)`` along ``chain`` with retries; the first success
    wins. Raises the last error when every generator gave up (``attempts`` set on it)."""
    rng = rng or _JITTER_RNG
    attempts = 0
    last_error: ImageServerError | None = None
    for name in chain:
        if cooldowns.cooling_until(name) is not None and name != chain[-1]:
            logger.info("skipping %s: cooling down", name)
            continue
        config = config_for(name)
        for number in range(1, config.retries + 2):
            attempts += 1
            try:
                value = await attempt(name, attempts)
            except ImageServerError as exc:
                last_error = exc
                if counts_against_generator(exc):
                    cooldowns.record_failure(name, config)
                if not exc.retryable or number > config.retries:
                    break
                retry_after = exc.retry_after if isinstance(exc, GenerationFailed) else None
                delay = backoff_delay(number, config.retry_backoff_s, retry_after, rng)
                logger.info("%s attempt %d failed (%s); retrying in %.2fs", name, number, exc.code, delay)
                await sleep(delay)
                continue
            cooldowns.record_success(name)
            return ChainResult(name, value, attempts)
        if isinstance(last_error, ContentPolicy):
            break  # a refusal is an answer about the content, not the provider: don't shop it around
    if last_error is None:
        last_error = GenerationFailed("every generator in the chain is cooling down", retryable=True)
    last_error.attempts = attempts
    raise last_error
