"""Hedged requests through the service's sockets: a slow generator raced against a hedge."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from image_server.client import RenderFailed
from image_server.errors import GenerationFailed
from image_server.generators.base import GeneratorConfig, RenderJob
from image_server.generators.mock import MockGenerator

GENERATORS = {"mock": {"strategy": "mock"}, "slow": {"strategy": "mock", "retries": 0}, "fast": {"strategy": "mock"}}
PRICES = {"prices": {"slow": {"per_image": 0.01}, "fast": {"per_image": 0.02}}}


class Scripted:
    """How long each render on ``slow`` takes (by a word in its prompt), and which were cancelled."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.started: list[tuple[str, str]] = []

    def factory(self, name: str, config: GeneratorConfig) -> MockGenerator:
        async def handler(job: RenderJob) -> None:
            self.started.append((name, job.request.request_id))
            prompt = job.request.prompt
            delay = 0.0
            if name == "slow":
                delay = 3.0 if "stall" in prompt else 0.6 if "sluggish" in prompt else 0.02
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                self.cancelled.append(f"{name}:{job.request.request_id}")
                raise
            if "broken" in prompt:
                raise GenerationFailed(f"{name} broke", generator=name, retryable=False)

        return MockGenerator(config, name=name, handler=handler)


def config(**hedge: Any) -> dict[str, Any]:
    return {"generators": GENERATORS, "spend": PRICES, "hedging": {"slow": {"hedge": "fast", **hedge}}}


async def test_a_stalled_render_is_hedged_and_the_loser_cancelled_and_charged(service_factory, client_for):
    script = Scripted()
    async with service_factory(factory=script.factory, **config(after_s=0.2)) as service, client_for(service) as client:
        started = time.perf_counter()
        done = await client.render(request_id="h-1", generator="slow", prompt="stall")
        elapsed = time.perf_counter() - started
        status = await client.status()
    assert done.event.generator == "fast" and elapsed < 2.5
    assert done.event.applied["hedge"] == {"after_s": 0.2, "winner": "fast", "loser": "slow", "loser_cost": 0.01}
    assert done.event.cost == pytest.approx(0.03)
    assert script.cancelled == ["slow:h-1"]
    spent = {g.name: g.spent_today for g in status.generators}
    assert spent["slow"] == pytest.approx(0.01) and spent["fast"] == pytest.approx(0.02)


async def test_no_hedge_when_max_cost_is_below_both_together(service_factory, client_for):
    script = Scripted()
    async with service_factory(factory=script.factory, **config(after_s=0.1)) as service, client_for(service) as client:
        done = await client.render(request_id="h-2", generator="slow", prompt="sluggish", max_cost=0.025)
    assert done.event.generator == "slow" and "hedge" not in done.event.applied
    assert done.event.cost == pytest.approx(0.01)
    assert ("fast", "h-2") not in script.started


async def test_hedging_waits_for_a_measured_p95(service_factory, client_for):
    script = Scripted()
    async with (
        service_factory(factory=script.factory, **config(min_samples=5)) as service,
        client_for(service) as client,
    ):
        quick = [await client.render(request_id=f"q-{i}", generator="slow", prompt="quick") for i in range(5)]
        started = time.perf_counter()
        done = await client.render(request_id="h-3", generator="slow", prompt="stall")
        elapsed = time.perf_counter() - started
    assert all("hedge" not in r.event.applied for r in quick)  # no p95 known yet, no after_s
    assert done.event.generator == "fast" and elapsed < 2.5
    assert 0 < done.event.applied["hedge"]["after_s"] < 1.0


async def test_when_both_fail_the_primary_error_is_reported(service_factory, client_for):
    script = Scripted()
    async with service_factory(factory=script.factory, **config(after_s=0.1)) as service, client_for(service) as client:
        with pytest.raises(RenderFailed) as failed:
            await client.render(request_id="h-4", generator="slow", prompt="sluggish broken")
    assert failed.value.code == "generation_failed" and "slow broke" in failed.value.event.message
    assert ("fast", "h-4") in script.started


def test_hedging_config_names_configured_generators(tmp_path):
    from image_server.errors import ConfigError
    from tests.conftest import make_config

    with pytest.raises(ConfigError, match="hedging.slow"):
        make_config(tmp_path, generators=GENERATORS, hedging={"slow": {"hedge": "nope"}})
