"""Waiting in tests for state that has no event to wait on: polled, under a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

POLL_S = 0.005


async def until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Return once ``condition()`` is true; TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(POLL_S)
