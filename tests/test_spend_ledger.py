"""Prices and the spend ledger on their own: rounding, periods rolling over, a file on disk."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from image_server.spend.ledger import SpendLedger
from image_server.spend.prices import BUILT_IN_PRICES, Price, actual, estimate
from image_server.spend.settings import Budget
from schemas import RenderRequest


def test_prices_per_image_megapixel_and_step():
    request = RenderRequest(request_id="r", prompt="p", width=1024, height=768, num_images=2, steps=10)
    assert estimate(Price(per_image=0.01, per_megapixel=0.1, per_step=0.001), request) == pytest.approx(
        2 * (0.01 + 0.1 * 0.786432 + 0.01), abs=1e-6
    )
    # fal bills whole megapixels: 0.79 MP is one.
    assert estimate(BUILT_IN_PRICES["fal"], request) == pytest.approx(2 * 0.003)
    # The actual cost follows what the provider applied, not what was asked.
    assert actual(Price(per_megapixel=1.0), request, {"width": 512, "height": 512}, images=1) == pytest.approx(0.262144)


async def test_budgets_roll_over_with_the_utc_day_and_persist(tmp_path: Path):
    now = [datetime(2026, 11, 30, 23, 59, tzinfo=UTC)]
    path = tmp_path / "spend.json"
    ledger = SpendLedger(path, {"g": Budget(daily=1.0, monthly=1.5)}, clock=lambda: now[0])
    ledger.charge("g", 1.0)
    assert ledger.over_budget("g") is not None and "daily budget of 1" in (ledger.over_budget("g") or "")
    await ledger.save()
    now[0] = datetime(2026, 12, 1, 0, 1, tzinfo=UTC)  # a new day and a new month
    assert ledger.over_budget("g") is None and ledger.spent("g") == (0.0, 0.0)
    now[0] = datetime(2026, 11, 30, 23, 59, 30, tzinfo=UTC)
    reloaded = SpendLedger(path, {"g": Budget(daily=1.0)}, clock=lambda: now[0])
    reloaded.load()
    assert reloaded.spent("g") == (1.0, 1.0)
    held = reloaded.reserve("g", 0.5)
    assert reloaded.over_budget("g") is not None
    reloaded.release(held)
    path.write_text("{not json")
    broken = SpendLedger(path, {})
    broken.load()  # unreadable: starts from zero, with an error in the log
    assert broken.spent("g") == (0.0, 0.0)
