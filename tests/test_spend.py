"""Prices, max_cost and budgets through the service's sockets, with priced mock generators."""

from __future__ import annotations

import asyncio
import tomllib
from collections import Counter
from typing import Any

import pytest

from image_server.client import RenderFailed
from image_server.config import build_config
from image_server.generators.base import GeneratorConfig, RenderJob
from image_server.generators.mock import MockGenerator
from schemas import RenderAccepted
from tests.test_config import EXAMPLE_BEGIN, SHIPPED, uncomment_examples
from tests.test_http_health import HTTP, get, samples, value

PRICED = {
    "prices": {
        "pricey": {"per_image": 0.01, "per_megapixel": 0.02},
        "dear": {"per_image": 0.5},
        "cheap": {"per_image": 0.001},
    }
}
GENERATORS = {
    "mock": {"strategy": "mock"},
    "pricey": {"strategy": "mock"},
    "dear": {"strategy": "mock"},
    "cheap": {"strategy": "mock"},
}


def counting_factory(calls: Counter[str]) -> Any:
    def factory(name: str, config: GeneratorConfig) -> MockGenerator:
        def handler(job: RenderJob) -> None:
            calls[name] += 1

        return MockGenerator(config, name=name, handler=handler)

    return factory


async def test_estimate_in_accepted_and_actual_cost_in_ready(service_factory, client_for):
    accepted: list[RenderAccepted] = []
    async with (
        service_factory(generators=GENERATORS, spend=PRICED) as service,
        client_for(service, on_event=lambda e: accepted.append(e) if isinstance(e, RenderAccepted) else None) as client,
    ):
        result = await client.render(request_id="cost-1", generator="pricey", prompt="p", width=500, height=400)
        status = await client.status()
    # 0.01 per image + 0.02 per megapixel * 0.2 MP
    assert accepted[0].estimated_cost == pytest.approx(0.014)
    assert result.event.cost == pytest.approx(0.014)
    pricey = next(g for g in status.generators if g.name == "pricey")
    assert pricey.spent_today == pytest.approx(0.014) and pricey.spent_month == pytest.approx(0.014)
    assert not pricey.over_budget


async def test_max_cost_refuses_before_anything_is_spent(service_factory, client_for):
    calls: Counter[str] = Counter()
    async with (
        service_factory(generators=GENERATORS, spend=PRICED, factory=counting_factory(calls)) as service,
        client_for(service) as client,
    ):
        with pytest.raises(RenderFailed) as refused:
            await client.render(request_id="cap-1", generator="dear", prompt="p", max_cost=0.1)
        assert refused.value.code == "over_budget" and "dear" in refused.value.event.message
        # The generator fits, but its fallback would not: refused too, up front.
        with pytest.raises(RenderFailed) as dearer:
            await client.render(request_id="cap-2", generator="cheap", fallbacks=["dear"], prompt="p", max_cost=0.1)
        assert dearer.value.code == "over_budget" and "fallback 'dear'" in dearer.value.event.message
        fits = await client.render(request_id="cap-3", generator="cheap", prompt="p", max_cost=0.1)
        assert fits.event.cost == pytest.approx(0.001)
        status = await client.status()
    assert calls == Counter({"cheap": 1})
    assert next(g for g in status.generators if g.name == "dear").spent_today == 0


async def test_daily_budget_turns_a_generator_off_and_survives_restart(service_factory, client_for):
    spend = {**PRICED, "budgets": {"dear": {"daily": 1.0}}}
    async with service_factory(generators=GENERATORS, spend=spend) as service, client_for(service) as client:
        for index in range(2):
            done = await client.render(request_id=f"b-{index}", generator="dear", prompt="p")
            assert done.event.generator == "dear"
        with pytest.raises(RenderFailed) as spent:
            await client.render(request_id="b-2", generator="dear", prompt="p")
        assert spent.value.code == "over_budget" and "daily budget of 1" in spent.value.event.message
        # A generator over budget is off: its fallback serves instead.
        moved = await client.render(request_id="b-3", generator="dear", fallbacks=["cheap"], prompt="p")
        assert moved.event.generator == "cheap"
        status = await client.status()
    dear = next(g for g in status.generators if g.name == "dear")
    assert dear.over_budget and dear.spent_today == pytest.approx(1.0)
    async with service_factory(generators=GENERATORS, spend=spend) as service, client_for(service) as client:
        with pytest.raises(RenderFailed) as still:
            await client.render(request_id="b-4", generator="dear", prompt="p")
        assert still.value.code == "over_budget"


async def test_budget_holds_for_requests_admitted_together(service_factory, client_for):
    """Each request fits alone; their estimates are reserved as they start, so not all run."""
    spend = {**PRICED, "budgets": {"dear": {"daily": 1.2}}}
    generators = {**GENERATORS, "dear": {"strategy": "mock", "delay_s": 0.3}}
    async with service_factory(generators=generators, spend=spend) as service, client_for(service) as client:
        outcomes = await asyncio.gather(
            *(client.render(request_id=f"burst-{i}", generator="dear", prompt="p") for i in range(4)),
            return_exceptions=True,
        )
    refused = [o for o in outcomes if isinstance(o, RenderFailed)]
    assert len(refused) == 2 and all(o.code == "over_budget" for o in refused)


async def test_spend_and_reuse_in_metrics(service_factory, client_for):
    spend = {**PRICED, "budgets": {"dear": {"daily": 0.5}}}
    async with (
        service_factory(http=HTTP, generators=GENERATORS, spend=spend) as service,
        client_for(service) as client,
    ):
        await client.render(request_id="m-1", generator="pricey", prompt="p", width=500, height=400, seed=1, cache=True)
        await client.render(request_id="m-2", generator="pricey", prompt="p", width=500, height=400, seed=1, cache=True)
        await client.render(request_id="m-3", generator="dear", prompt="p")
        parsed = samples((await get(service, "/metrics")).text)
    assert value(parsed, "image_server_spend_total", generator="pricey") == pytest.approx(0.014)
    assert value(parsed, "image_server_spend_total", generator="dear") == pytest.approx(0.5)
    assert value(parsed, "image_server_reused_answers_total", generator="pricey", source="cache") == 1
    assert value(parsed, "image_server_spent_today", generator="pricey") == pytest.approx(0.014)
    assert value(parsed, "image_server_spent_month", generator="dear") == pytest.approx(0.5)
    assert value(parsed, "image_server_generator_over_budget", generator="dear") == 1
    assert value(parsed, "image_server_generator_over_budget", generator="pricey") == 0
    assert value(parsed, "image_server_cache_entries") == 1


def test_the_shipped_spending_example_is_what_the_readme_says():
    openings = [line for line in SHIPPED.splitlines() if line.startswith(EXAMPLE_BEGIN)]
    block = next(number for number, line in enumerate(openings) if "spend less" in line)
    config = build_config(tomllib.loads(uncomment_examples(SHIPPED, only=block, optional=True)))
    assert config.spend.prices["mock"].per_image == 0.002 and config.spend.prices["mock"].round_megapixels_up
    assert config.spend.budgets["mock"].daily == 5.0
    assert config.hedging["mock"].hedge == "mock_backup" and config.hedging["mock"].after_s == 5.0
    assert config.prompting.per_generator == {"mock": "compress"}
    assert config.prompting.ollama.model == "llama3.2:1b" and not config.cache.default_on
