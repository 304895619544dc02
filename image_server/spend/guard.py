"""Spend checks around a render: estimates, ``max_cost``, budgets, and charging what it cost.

At admission (nothing spent yet) a generator whose budget is spent leaves the chain, and
the request is refused with ``over_budget`` when no generator is left or when the dearest
generator it might run on costs more than its ``max_cost``. When the render starts, its
estimate is reserved against the budget; when it ends, the actual cost is charged.
"""

from __future__ import annotations

from collections.abc import Callable

from image_server.errors import OverBudget
from image_server.spend.ledger import Reservation, SpendLedger
from image_server.spend.prices import Price, actual, estimate, price_for
from image_server.spend.settings import SpendConfig
from schemas import ImageReady, RenderRequest


class SpendGuard:
    def __init__(self, config: SpendConfig, ledger: SpendLedger, strategy_of: Callable[[str], str]) -> None:
        self.config = config
        self.ledger = ledger
        self._strategy_of = strategy_of

    def price(self, generator: str) -> Price | None:
        return price_for(generator, self._strategy_of(generator), self.config.prices)

    def estimate(self, generator: str, request: RenderRequest) -> float | None:
        price = self.price(generator)
        return None if price is None else estimate(price, request)

    def admit(self, request: RenderRequest, chain: list[str]) -> tuple[list[str], float | None]:
        """The chain without generators over budget, and the first one's estimate."""
        affordable: list[str] = []
        reasons: list[str] = []
        for name in chain:
            reason = self.ledger.over_budget(name)
            if reason is None:
                affordable.append(name)
            else:
                reasons.append(reason)
        if not affordable:
            raise OverBudget("; ".join(reasons), request_id=request.request_id, generator=chain[0])
        if request.max_cost is not None:
            for name in affordable:
                cost = self.estimate(name, request)
                if cost is None:
                    raise OverBudget(
                        f"generator {name!r} has no price in [spend.prices], so max_cost "
                        f"{request.max_cost:g} cannot be guaranteed",
                        request_id=request.request_id,
                        generator=name,
                    )
                if cost > request.max_cost:
                    role = "its generator" if name == affordable[0] else "its fallback"
                    raise OverBudget(
                        f"{role} {name!r} would cost about {cost:g} {self.config.currency}, "
                        f"over the request's max_cost of {request.max_cost:g}",
                        request_id=request.request_id,
                        generator=name,
                    )
        return affordable, self.estimate(affordable[0], request)

    def reserve(self, request: RenderRequest, generator: str) -> Reservation:
        """Hold the estimate against ``generator``'s budget; over_budget if it no longer fits
        (requests admitted together that each fit alone)."""
        amount = self.estimate(generator, request) or 0.0
        reason = self.ledger.over_budget(generator, amount)
        if reason is not None:
            raise OverBudget(reason, request_id=request.request_id, generator=generator)
        return self.ledger.reserve(generator, amount)

    def settle(self, reservation: Reservation, request: RenderRequest, event: ImageReady | None) -> float | None:
        """Release the hold and charge what ``event``'s render cost (None: no price known)."""
        self.ledger.release(reservation)
        if event is None:
            return None
        price = self.price(event.generator)
        if price is None:
            return None
        cost = actual(price, request, event.applied, len(event.images))
        self.ledger.charge(event.generator, cost)
        return cost
