"""GeneratorManager: resolution, override cache, eviction and close, limits, timeouts."""

from __future__ import annotations

import asyncio

import pytest

from image_server.errors import GenerationTimeout, GeneratorNotFound, InvalidRequest
from image_server.generators.base import GenerationResult, Generator, GeneratorConfig, RenderJob
from image_server.generators.mock import MockConfig, MockGenerator
from image_server.manager import GeneratorManager
from schemas import RenderRequest


class Tracked(MockGenerator):
    instances: list[Tracked] = []

    def __init__(self, config, *, name=None, handler=None):
        super().__init__(config, name=name, handler=handler)
        self.closed = 0
        Tracked.instances.append(self)

    async def aclose(self) -> None:
        self.closed += 1
        await super().aclose()


def tracked_factory(name: str, config: GeneratorConfig) -> Generator:
    return Tracked(config, name=name)


def job(rid: str = "r1", **fields) -> RenderJob:
    return RenderJob(RenderRequest(request_id=rid, prompt="p", width=64, height=64, **fields))


def configs(**extra) -> dict[str, GeneratorConfig]:
    return {"mock": MockConfig(strategy="mock", **extra), "other": MockConfig(strategy="mock")}


@pytest.fixture(autouse=True)
def reset_tracked():
    Tracked.instances = []


async def test_unknown_name_lists_configured_generators():
    manager = GeneratorManager(configs(), default="mock")
    assert manager.resolve(None) == "mock"
    with pytest.raises(GeneratorNotFound, match="configured generators: mock, other"):
        manager.resolve("missing")
    assert manager.available() == ["mock", "other"] and manager.is_image_to_image("mock")


async def test_instances_cached_per_overrides():
    async with GeneratorManager(configs(), default="mock", factory=tracked_factory) as manager:
        await manager.generate("mock", job("a"))
        await manager.generate("mock", job("b"))
        await manager.generate("mock", job("c", generator_config={"style": "debug"}))
        await manager.generate("mock", job("d", generator_config={"style": "debug"}))
        assert len(Tracked.instances) == 2
        assert Tracked.instances[1].config.style == "debug"
    assert [t.closed for t in Tracked.instances] == [1, 1]


async def test_refused_and_invalid_overrides():
    manager = GeneratorManager(configs(), default="mock")
    with pytest.raises(InvalidRequest, match="concurrency"):
        manager.validate_overrides("mock", {"concurrency": 100})
    with pytest.raises(InvalidRequest, match="fail_rate"):
        manager.validate_overrides("mock", {"fail_rate": 2})
    assert manager.validate_overrides("mock", {"delay_s": 0.5}).delay_s == 0.5


async def test_eviction_closes_idle_instances_and_busy_ones_after_use():
    gate = asyncio.Event()

    async def handler(j: RenderJob) -> None:
        if j.request.prompt == "hold":
            await gate.wait()

    def factory(name, config):
        return Tracked(config, name=name, handler=handler)

    async with GeneratorManager(configs(), default="mock", factory=factory, cache_size=1) as manager:
        busy = asyncio.create_task(manager.generate("mock", RenderJob(RenderRequest(request_id="h", prompt="hold"))))
        while not Tracked.instances:
            await asyncio.sleep(0.01)
        await manager.generate("other", job())  # evicts the busy "mock" instance
        assert Tracked.instances[0].closed == 0, "closed while still rendering"
        gate.set()
        await busy
        async with asyncio.timeout(2):
            while Tracked.instances[0].closed == 0:
                await asyncio.sleep(0.01)
        await manager.generate("mock", job())  # recreated, evicting "other" (idle: closed at once)
        async with asyncio.timeout(2):
            while Tracked.instances[1].closed == 0:
                await asyncio.sleep(0.01)
    assert all(t.closed == 1 for t in Tracked.instances)


async def test_concurrency_limit_per_generator():
    running, peak = 0, 0

    async def handler(j: RenderJob) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1

    def factory(name, config):
        return MockGenerator(config, name=name, handler=handler)

    async with GeneratorManager(configs(concurrency=2), default="mock", factory=factory) as manager:

        async def one(i: int) -> GenerationResult:
            async with manager.slot("mock", owner=str(i)):
                return await manager.generate("mock", job(str(i)))

        await asyncio.gather(*(one(i) for i in range(6)))
    assert peak == 2


async def test_timeout_cancels_the_generator():
    cancelled = asyncio.Event()

    async def handler(j: RenderJob) -> None:
        try:
            await asyncio.Event().wait()  # a backend that never answers
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def factory(name, config):
        return MockGenerator(config, name=name, handler=handler)

    async with GeneratorManager(configs(timeout_s=0.1), default="mock", factory=factory) as manager:
        with pytest.raises(GenerationTimeout, match="within 0.1 s"):
            await manager.generate("mock", job())
    assert cancelled.is_set()


async def test_lifecycle_errors():
    manager = GeneratorManager(configs(), default="mock")
    with pytest.raises(RuntimeError, match="not open"):
        await manager.generate("mock", job())
    async with manager:
        with pytest.raises(RuntimeError, match="more than once"):
            await manager.__aenter__()
    await manager.aclose()  # idempotent
    with pytest.raises(RuntimeError, match="reopen"):
        await manager.__aenter__()
