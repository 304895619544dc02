"""The spend ledger: what each generator has cost today and this month (UTC), kept on disk.

Costs are settled when a render finishes; while it runs its estimate is reserved, so a
burst of requests admitted together cannot overrun a budget that each alone fits in. The
totals survive restarts in ``state_dir/spend.json`` (written atomically, off the loop).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from image_server.spend.settings import Budget
from image_server.storage import write_atomic

logger = logging.getLogger(__name__)


@dataclass
class Reservation:
    generator: str
    amount: float
    open: bool = True


def _utc_now() -> datetime:
    return datetime.now(UTC)


class SpendLedger:
    def __init__(
        self, path: Path | None, budgets: Mapping[str, Budget], *, clock: Callable[[], datetime] = _utc_now
    ) -> None:
        self.path = path
        self.budgets = dict(budgets)
        self.clock = clock
        self._days: dict[str, dict[str, float]] = {}
        self._months: dict[str, dict[str, float]] = {}
        self._reserved: defaultdict[str, float] = defaultdict(float)
        self._save_lock = asyncio.Lock()

    # -- persistence ------------------------------------------------------------------

    def load(self) -> None:
        """Read the totals a previous run left (blocking: call from a thread)."""
        if self.path is None or not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text())
            self._days = {k: {g: float(x) for g, x in v.items()} for k, v in data.get("days", {}).items()}
            self._months = {k: {g: float(x) for g, x in v.items()} for k, v in data.get("months", {}).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            logger.exception("spend ledger %s is unreadable; starting from zero", self.path)

    async def save(self) -> None:
        if self.path is None:
            return
        day, month = self._keys()
        # Only the current periods matter for budgets; older ones would grow the file forever.
        data = {
            "days": {day: dict(self._days.get(day, {}))},
            "months": {month: dict(self._months.get(month, {}))},
        }
        async with self._save_lock:
            path = self.path
            await asyncio.to_thread(write_atomic, path, json.dumps(data, sort_keys=True).encode())

    # -- reading ----------------------------------------------------------------------

    def _keys(self) -> tuple[str, str]:
        now = self.clock().astimezone(UTC)
        return now.strftime("%Y-%m-%d"), now.strftime("%Y-%m")

    def spent(self, generator: str) -> tuple[float, float]:
        """(today, this month) settled for ``generator``."""
        day, month = self._keys()
        return (
            round(self._days.get(day, {}).get(generator, 0.0), 6),
            round(self._months.get(month, {}).get(generator, 0.0), 6),
        )

    def over_budget(self, generator: str, extra: float = 0.0) -> str | None:
        """Why ``generator`` cannot take ``extra`` more (a sentence), or None if it can."""
        budget = self.budgets.get(generator)
        if budget is None:
            return None
        today, month = self.spent(generator)
        pending = self._reserved[generator] + extra
        for period, spent, ceiling in (("daily", today, budget.daily), ("monthly", month, budget.monthly)):
            if ceiling is None:
                continue
            if spent >= ceiling or spent + pending > ceiling:
                return f"generator {generator!r} has spent {spent:g} of its {period} budget of {ceiling:g}"
        return None

    # -- writing ----------------------------------------------------------------------

    def reserve(self, generator: str, amount: float) -> Reservation:
        self._reserved[generator] += amount
        return Reservation(generator, amount)

    def release(self, reservation: Reservation) -> None:
        if reservation.open:
            reservation.open = False
            self._reserved[reservation.generator] -= reservation.amount

    def charge(self, generator: str, amount: float) -> None:
        if amount <= 0:
            return
        day, month = self._keys()
        for periods, key in ((self._days, day), (self._months, month)):
            totals = periods.setdefault(key, {})
            totals[generator] = totals.get(generator, 0.0) + amount
