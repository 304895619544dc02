"""``[spend]`` in config.toml: price tables and budgets per generator."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from image_server.spend.prices import Price


class Budget(BaseModel):
    """``[spend.budgets.<generator>]``: ceilings per UTC day and calendar month."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    daily: float | None = Field(default=None, ge=0)
    monthly: float | None = Field(default=None, ge=0)


class SpendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    currency: str = "USD"  # the unit of every price, max_cost and budget (not converted)
    prices: dict[str, Price] = Field(default_factory=dict)  # by generator name; else built-in defaults
    budgets: dict[str, Budget] = Field(default_factory=dict)
