"""Batches through the service's sockets: members answered on their own, one BatchDone, cancel, restart."""

from __future__ import annotations

import asyncio

import pytest

from image_server.client import RenderFailed, RenderResult
from image_server.errors import GenerationFailed
from image_server.generators.base import GeneratorConfig, RenderJob
from image_server.generators.mock import MockGenerator
from schemas import RenderAccepted, RenderError

PROMPTS = ["a red fox", "a blue whale", "a green frog"]


def failing_factory(name: str, config: GeneratorConfig) -> MockGenerator:
    def handler(job: RenderJob) -> None:
        if "broken" in job.request.prompt:
            raise GenerationFailed("this member broke", generator=name, retryable=False)

    return MockGenerator(config, name=name, handler=handler)


async def test_each_prompt_is_its_own_render_then_one_batch_done(service_factory, client_for):
    seen: list[object] = []
    spend = {"prices": {"mock": {"per_image": 0.01}}}
    async with (
        service_factory(spend=spend) as service,
        client_for(service, on_event=seen.append) as client,
    ):
        result = await client.render_batch(PROMPTS, request_id="batch-1", width=64, height=64, metadata={"m": 1})
    done = result.done
    assert done.request_id == "batch-1" and done.succeeded == 3 and done.failed == 0
    assert [m.request_id for m in done.members] == ["batch-1:0", "batch-1:1", "batch-1:2"]
    assert done.cost == pytest.approx(0.03) and done.metadata == {"m": 1}
    for index, prompt in enumerate(PROMPTS):
        member = result.members[index]
        assert isinstance(member, RenderResult)
        assert member.event.request_id == f"batch-1:{index}" and member.event.prompt == prompt
        assert member.event.batch_id == "batch-1" and member.event.batch_index == index
    accepted = {e.request_id: e for e in seen if isinstance(e, RenderAccepted)}
    assert {"batch-1", "batch-1:0", "batch-1:1", "batch-1:2"} <= set(accepted)
    assert accepted["batch-1"].estimated_cost == pytest.approx(0.03)
    # BatchDone comes after every member's terminal event.
    order = [getattr(e, "request_id", "") for e in seen if type(e).__name__ in ("ImageReady", "BatchDone")]
    assert order[-1] == "batch-1" and len(order) == 4


async def test_a_failing_member_and_a_refused_batch(service_factory, client_for):
    async with service_factory(factory=failing_factory) as service, client_for(service) as client:
        result = await client.render_batch(["fine", "broken", "fine too"], request_id="b-2", width=64, height=64)
        with pytest.raises(RenderFailed) as refused:
            await client.render_batch(PROMPTS, request_id="b-3", generator="nope", timeout=5)
    assert (result.done.succeeded, result.done.failed) == (2, 1)
    assert result.done.members[1].code == "generation_failed"
    failed = result.members[1]
    assert isinstance(failed, RenderError) and failed.batch_index == 1 and failed.request_id == "b-2:1"
    assert refused.value.code == "unknown_generator"


async def test_cancelling_a_batch_cancels_its_members(service_factory, client_for):
    slow = {"mock": {"strategy": "mock", "delay_s": 20, "concurrency": 1}}
    async with service_factory(generators=slow) as service, client_for(service) as client:
        task = asyncio.create_task(client.render_batch(PROMPTS, request_id="b-4", width=64, height=64, timeout=30))
        async with asyncio.timeout(5):
            while not all(f"b-4:{i}" in service.active for i in range(3)):
                await asyncio.sleep(0.01)
        await client.cancel("b-4")
        async with asyncio.timeout(10):
            result = await task
    assert result.done.failed == 3 and {m.code for m in result.done.members} == {"cancelled"}


async def test_a_repeat_gets_the_same_batch_done(service_factory, client_for):
    async with service_factory() as service, client_for(service) as client:
        first = await client.render_batch(PROMPTS[:2], request_id="b-5", width=64, height=64)
        again = await client.render_batch(PROMPTS[:2], request_id="b-5", width=64, height=64)
    assert again.done.model_dump(exclude={"seq"}) == first.done.model_dump(exclude={"seq"})


async def test_a_batch_left_unfinished_finishes_after_a_restart(service_factory, client_for):
    stuck = {"mock": {"strategy": "mock", "delay_s": 60}}
    # The same client both times: a request id belongs to the client that sent it.
    async with (
        service_factory(generators=stuck, shutdown_timeout_s=0.2) as service,
        client_for(service, client_id="batcher") as client,
    ):
        task = asyncio.create_task(client.render_batch(PROMPTS, request_id="b-6", width=64, height=64, timeout=60))
        async with asyncio.timeout(5):
            while not all(f"b-6:{i}" in service.active for i in range(3)):
                await asyncio.sleep(0.01)
    task.cancel()
    async with service_factory() as service, client_for(service, client_id="batcher") as client:
        resumed = service.counters["resumed"]
        # The batch resumed on its own at start; asking again gets its BatchDone (live or stored).
        result = await client.render_batch(PROMPTS, request_id="b-6", width=64, height=64, timeout=20)
    assert resumed == 4  # the batch and its three members
    assert result.done.request_id == "b-6" and result.done.succeeded == 3


async def test_a_member_refused_before_a_restart_is_summed_up_after_it(service_factory, client_for):
    limited = {"strategy": "mock", "max_prompt_chars": 12}
    prompts = ["a red fox", "a prompt longer than twelve", "a blue whale"]
    async with (
        service_factory(generators={"mock": {**limited, "delay_s": 60}}, shutdown_timeout_s=0.2) as service,
        client_for(service, client_id="batcher") as client,
    ):
        task = asyncio.create_task(client.render_batch(prompts, request_id="b-7", width=64, height=64, timeout=60))
        async with asyncio.timeout(5):
            while not all(f"b-7:{i}" in service.active for i in (0, 2)):
                await asyncio.sleep(0.01)
    task.cancel()
    async with (
        service_factory(generators={"mock": limited}) as service,
        client_for(service, client_id="batcher") as client,
    ):
        result = await client.render_batch(prompts, request_id="b-7", width=64, height=64, timeout=20)
    assert (result.done.succeeded, result.done.failed) == (2, 1)
    assert result.done.members[1].code == "prompt_too_long"
