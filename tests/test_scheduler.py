"""Scheduler: global bound, per-key limits, priorities, cancellation while waiting."""

from __future__ import annotations

import asyncio

from image_server.scheduler import Scheduler


async def hold(scheduler, key, limit, priority, order, gate, owner=""):
    async with scheduler.slot(key, limit, priority, owner=owner):
        order.append(owner)
        await gate.wait()


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def test_global_bound_and_priority_order():
    scheduler = Scheduler(max_in_flight=1)
    gate = asyncio.Event()
    order: list[str] = []
    first = asyncio.create_task(hold(scheduler, "a", 10, 0, order, gate, "first"))
    await settle()
    waiters = [
        asyncio.create_task(hold(scheduler, "a", 10, priority, order, gate, name))
        for name, priority in (("low", 0), ("high", 5), ("low2", 0), ("mid", 1))
    ]
    await settle()
    assert scheduler.in_flight == 1 and scheduler.queued == 4
    assert scheduler.position("high") == 1 and scheduler.position("low2") == 4
    gate.set()
    async with asyncio.timeout(2):
        await asyncio.gather(first, *waiters)
    assert order == ["first", "high", "mid", "low", "low2"]
    assert scheduler.in_flight == 0


async def test_busy_key_does_not_block_other_keys():
    scheduler = Scheduler(max_in_flight=4)
    gate = asyncio.Event()
    order: list[str] = []
    tasks = [asyncio.create_task(hold(scheduler, "slow", 1, 9, order, gate, f"slow{i}")) for i in range(3)]
    await settle()
    other = asyncio.create_task(hold(scheduler, "fast", 1, 0, order, gate, "fast"))
    await settle()
    assert order == ["slow0", "fast"] and scheduler.running("slow") == 1
    gate.set()
    async with asyncio.timeout(2):
        await asyncio.gather(*tasks, other)


async def test_cancelled_waiter_leaves_the_queue_and_frees_nothing_it_did_not_hold():
    scheduler = Scheduler(max_in_flight=1)
    gate = asyncio.Event()
    order: list[str] = []
    first = asyncio.create_task(hold(scheduler, "a", 1, 0, order, gate, "first"))
    await settle()
    waiting = asyncio.create_task(hold(scheduler, "a", 1, 0, order, gate, "waiting"))
    await settle()
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert scheduler.queued == 0 and scheduler.in_flight == 1
    gate.set()
    await first
    assert scheduler.in_flight == 0 and order == ["first"]


async def test_clients_take_turns_so_a_flood_does_not_delay_another_client():
    scheduler = Scheduler(max_in_flight=1)
    order: list[str] = []
    turn = asyncio.Event()

    async def one(client: str, name: str) -> None:
        async with scheduler.slot("k", 1, 0, owner=name, client=client):
            order.append(name)
            await turn.wait()

    flood = [asyncio.create_task(one("flood", f"f{i}")) for i in range(20)]
    await settle()
    late = [asyncio.create_task(one("polite", f"p{i}")) for i in range(2)]
    await settle()
    assert scheduler.position("p0") == 2  # behind one queued flood request, not nineteen
    turn.set()
    async with asyncio.timeout(2):
        await asyncio.gather(*flood, *late)
    assert order[:5] == ["f0", "f1", "p0", "f2", "p1"]
    # Within a client, and with one client only, first in first out as before.
    assert [name for name in order if name.startswith("f")] == [f"f{i}" for i in range(20)]


async def test_queue_positions_and_start_order_across_keys():
    """Waiters of several keys form one queue: positions count every waiter ahead of any key,
    and slots go in that order to whichever key has room."""
    scheduler = Scheduler(max_in_flight=2)
    gates = {"a": asyncio.Event(), "b": asyncio.Event()}
    order: list[str] = []
    running = [
        asyncio.create_task(hold(scheduler, key, 1, 0, order, gates[key], f"{key}-running")) for key in ("a", "b")
    ]
    await settle()
    names = [("a", 0, "a1"), ("b", 0, "b1"), ("a", 3, "a-urgent"), ("b", 0, "b2"), ("a", 0, "a2")]
    waiters = [asyncio.create_task(hold(scheduler, key, 1, prio, order, gates[key], name)) for key, prio, name in names]
    await settle()
    assert scheduler.queued == 5 and scheduler.queued_by_key() == {"a": 3, "b": 2}
    positions = {name: scheduler.position(name) for _, _, name in names}
    assert positions == {"a-urgent": 1, "a1": 2, "b1": 3, "b2": 4, "a2": 5}
    gates["b"].set()  # b's slot frees: b1 then b2 start; a's waiters stay queued
    await settle()
    assert order[2:] == ["b1", "b2"] and scheduler.position("a1") == 2
    gates["a"].set()
    await asyncio.gather(*running, *waiters)
    assert order[4:] == ["a-urgent", "a1", "a2"] and scheduler.queued == 0


async def test_a_request_waiting_on_two_keys_keeps_its_first_place():
    """A hedged request waits for two generators at once under one owner."""
    scheduler = Scheduler(max_in_flight=1)
    gate = asyncio.Event()
    order: list[str] = []
    busy = asyncio.create_task(hold(scheduler, "a", 1, 0, order, gate, "busy"))
    await settle()
    other = asyncio.create_task(hold(scheduler, "a", 1, 0, order, gate, "other"))
    await settle()
    primary = asyncio.create_task(hold(scheduler, "a", 1, 0, order, gate, "hedged"))
    hedge = asyncio.create_task(hold(scheduler, "b", 1, 0, order, gate, "hedged"))
    await settle()
    assert scheduler.position("hedged") == 2
    hedge.cancel()
    await settle()
    assert scheduler.position("hedged") == 2 and scheduler.queued == 2
    gate.set()
    await asyncio.gather(busy, other, primary)
    assert order == ["busy", "other", "hedged"]
