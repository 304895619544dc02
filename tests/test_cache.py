"""The result cache and coalescing through the service's sockets, and the disk storage's bounds."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from image_server.cache.entry import CachedImage, CachedResult
from image_server.cache.storage import DiskCacheStorage
from image_server.client import RenderFailed
from image_server.generators.base import GeneratorConfig, RenderJob
from image_server.generators.mock import MockGenerator
from schemas import ImageSource
from tests.fakes.images import solid_bytes

SLOW = {"mock": {"strategy": "mock", "delay_s": 0.5}}


def counting_factory(calls: Counter[str]) -> Any:
    def factory(name: str, config: GeneratorConfig) -> MockGenerator:
        def handler(job: RenderJob) -> None:
            calls[job.request.request_id] += 1

        return MockGenerator(config, name=name, handler=handler)

    return factory


async def test_cache_hit_is_byte_identical_and_renders_nothing(service_factory, client_for):
    calls: Counter[str] = Counter()
    async with service_factory(factory=counting_factory(calls)) as service, client_for(service) as client:
        first = await client.render(request_id="c-1", prompt="a fox", seed=7, cache=True, width=256, height=256)
        again = await client.render(
            request_id="c-2",
            prompt="a fox",
            seed=7,
            cache=True,
            width=256,
            height=256,
            delivery="frames",
            metadata={"mine": 2},
        )
        status = await client.status()
    original = Path(first.event.images[0].path or "").read_bytes()
    assert not first.event.cached and first.event.cached_from is None
    assert again.event.cached and again.event.cached_from == "c-1"
    assert again.event.request_id == "c-2" and again.event.metadata == {"mine": 2}
    assert again.image_bytes() == original
    assert again.event.images[0].sha256 == hashlib.sha256(original).hexdigest()
    assert again.event.cost == 0.0
    assert list(calls) == ["c-1"]
    assert status.counters["cache_hits"] == 1 and status.counters["cache_entries"] == 1


async def test_what_is_not_cached(service_factory, client_for):
    calls: Counter[str] = Counter()
    async with service_factory(factory=counting_factory(calls)) as service, client_for(service) as client:
        # No seed: a new random image each time, unless the user accepts an earlier one.
        await client.render(request_id="r-1", prompt="p", cache=True, width=64, height=64)
        fresh = await client.render(request_id="r-2", prompt="p", cache=True, width=64, height=64)
        assert not fresh.event.cached
        await client.render(request_id="r-3", prompt="p", cache=True, cache_any_seed=True, width=64, height=64)
        anyseed = await client.render(
            request_id="r-4", prompt="p", cache=True, cache_any_seed=True, width=64, height=64
        )
        assert anyseed.event.cached_from == "r-3"
        # Not asked for: rendered again.
        await client.render(request_id="s-1", prompt="p", seed=1, width=64, height=64)
        plain = await client.render(request_id="s-2", prompt="p", seed=1, width=64, height=64)
        assert not plain.event.cached
        # Another parameter or another reference: another key.
        await client.render(request_id="k-1", prompt="p", seed=1, cache=True, width=64, height=64, steps=3)
        other = await client.render(request_id="k-2", prompt="p", seed=1, cache=True, width=64, height=64, steps=4)
        assert not other.event.cached
        red, blue = solid_bytes((255, 0, 0), (64, 64)), solid_bytes((0, 0, 255), (64, 64))
        ref = ImageSource(frame=0)
        await client.render(request_id="i-1", prompt="p", seed=1, cache=True, reference_image=ref, images=[red])
        same = await client.render(request_id="i-2", prompt="p", seed=1, cache=True, reference_image=ref, images=[red])
        diff = await client.render(request_id="i-3", prompt="p", seed=1, cache=True, reference_image=ref, images=[blue])
        assert same.event.cached_from == "i-1" and not diff.event.cached
    assert set(calls) == {"r-1", "r-2", "r-3", "s-1", "s-2", "k-1", "k-2", "i-1", "i-3"}


async def test_cache_is_on_per_generator_and_survives_restart(service_factory, client_for):
    cached = {"cache": {"default_on": ["mock"]}}
    async with service_factory(**cached) as service, client_for(service) as client:
        first = await client.render(request_id="d-1", prompt="p", seed=3, width=128, height=128, delivery="inline")
    async with service_factory(**cached) as service, client_for(service) as client:
        again = await client.render(request_id="d-2", prompt="p", seed=3, width=128, height=128, delivery="inline")
        refused = await client.render(
            request_id="d-3", prompt="p", seed=3, width=128, height=128, delivery="inline", cache=False
        )
    assert again.event.cached and again.event.cached_from == "d-1"
    assert again.event.images[0].data == first.event.images[0].data
    assert not refused.event.cached


async def test_identical_requests_in_flight_render_once(service_factory, client_for):
    calls: Counter[str] = Counter()
    async with (
        service_factory(generators=SLOW, factory=counting_factory(calls), limits={"max_in_flight": 200}) as service,
        client_for(service) as client,
    ):
        results = await asyncio.gather(
            *(
                client.render(
                    request_id=f"co-{i}",
                    prompt="same",
                    seed=5,
                    cache=True,
                    width=64,
                    height=64,
                    delivery="frames",
                    metadata={"i": i},
                    timeout=60,
                )
                for i in range(100)
            )
        )
    assert sum(calls.values()) == 1
    leader = next(iter(calls))
    assert {r.event.request_id for r in results} == {f"co-{i}" for i in range(100)}
    assert all(r.event.metadata == {"i": int(r.event.request_id[3:])} for r in results)
    assert len({r.image_bytes() for r in results}) == 1
    followers = [r for r in results if r.event.request_id != leader]
    assert all(r.event.cached_from == leader and not r.event.cached for r in followers)


async def test_a_cancelled_leader_leaves_its_followers_served(service_factory, client_for):
    calls: Counter[str] = Counter()
    async with (
        service_factory(generators=SLOW, factory=counting_factory(calls)) as service,
        client_for(service) as client,
    ):
        fields = {"prompt": "same", "seed": 9, "cache": True, "width": 64, "height": 64}
        leader = asyncio.create_task(client.render(request_id="lead", **fields))
        async with asyncio.timeout(5):
            while "lead" not in calls:
                await asyncio.sleep(0.01)
        follower = asyncio.create_task(client.render(request_id="follow", **fields))
        async with asyncio.timeout(5):
            while "follow" not in service.active:
                await asyncio.sleep(0.01)
        await client.cancel("lead")
        with pytest.raises(RenderFailed) as cancelled:
            await leader
        assert cancelled.value.code == "cancelled"
        served = await follower
    assert served.event.request_id == "follow" and served.event.cached_from is None
    assert set(calls) == {"lead", "follow"}


def _result(key: str, size: int, created_at: float) -> CachedResult:
    image = CachedImage(data=key.encode() * size, width=1, height=1, format="png", seed=1, sha256=None)
    return CachedResult(source_request_id=key, generator="mock", images=[image], created_at=created_at)


async def test_disk_storage_bounds_by_age_and_size(tmp_path: Path):
    now = [1000.0]
    storage = DiskCacheStorage(tmp_path, max_bytes=250, max_age_s=60, memory_bytes=0, clock=lambda: now[0])
    await storage.open()
    await storage.put("a" * 64, _result("a", 100, now[0]))
    await storage.put("b" * 64, _result("b", 100, now[0]))
    assert await storage.get("a" * 64) is not None  # a is now the most recently used
    await storage.put("c" * 64, _result("c", 100, now[0]))  # over 250 bytes: b goes
    assert await storage.get("b" * 64) is None
    assert (await storage.get("a" * 64)) is not None
    now[0] += 61
    assert await storage.get("a" * 64) is None  # too old
    assert not (tmp_path / "aa" / ("a" * 64)).exists()
    # A fresh instance over the same folder finds what is left, byte for byte.
    now[0] -= 61
    reopened = DiskCacheStorage(tmp_path, max_bytes=250, max_age_s=60, memory_bytes=0, clock=lambda: now[0])
    (tmp_path / "cc" / ".half-written").mkdir(parents=True)
    await reopened.open()
    found = await reopened.get("c" * 64)
    assert found is not None and found.images[0].data == b"c" * 100
    assert not (tmp_path / "cc" / ".half-written").exists()


async def test_a_follower_keeps_its_own_timeout(service_factory, client_for):
    calls: Counter[str] = Counter()
    async with (
        service_factory(
            generators={"mock": {"strategy": "mock", "delay_s": 1.5}}, factory=counting_factory(calls)
        ) as service,
        client_for(service) as client,
    ):
        fields = {"prompt": "same", "seed": 4, "cache": True, "width": 64, "height": 64}
        leader = asyncio.create_task(client.render(request_id="patient", **fields))
        async with asyncio.timeout(5):
            while "patient" not in calls:
                await asyncio.sleep(0.01)
        with pytest.raises(RenderFailed) as hurried:
            await client.render(request_id="hurried", timeout_s=0.3, **fields)
        assert hurried.value.code == "timeout" and "identical request" in hurried.value.event.message
        assert (await leader).event.request_id == "patient"
    assert list(calls) == ["patient"]
