"""ProgressThrottle: rate-limited provider updates that never lose the latest one."""

from __future__ import annotations

import asyncio

from image_server.progress import ProgressThrottle
from schemas import RenderProgress


def generating(fraction: float) -> RenderProgress:
    return RenderProgress(request_id="r", stage="generating", progress=fraction)


async def test_burst_is_thinned_but_the_last_update_arrives():
    sent: list[RenderProgress] = []
    got_last = asyncio.Event()

    def send(event: RenderProgress) -> None:
        sent.append(event)
        if event.progress == 1.0:
            got_last.set()

    throttle = ProgressThrottle(send, interval_s=0.05)
    for step in range(1, 101):
        throttle(generating(step / 100))
    async with asyncio.timeout(2):
        await got_last.wait()
    assert [e.progress for e in sent] == [0.01, 1.0]


async def test_stage_changes_pass_at_once_and_drop_a_stale_pending_update():
    sent: list[RenderProgress] = []
    throttle = ProgressThrottle(sent.append, interval_s=0.05)
    throttle(RenderProgress(request_id="r", stage="started"))
    throttle(generating(0.1))
    throttle(generating(0.5))  # pending behind the interval
    throttle(RenderProgress(request_id="r", stage="storing"))
    await asyncio.sleep(0.1)  # longer than the interval: a stale update would have been flushed by now
    assert [(e.stage, e.progress) for e in sent] == [("started", None), ("generating", 0.1), ("storing", None)]


async def test_cancel_stops_a_pending_update():
    sent: list[RenderProgress] = []
    throttle = ProgressThrottle(sent.append, interval_s=0.05)
    throttle(generating(0.1))
    throttle(generating(0.2))
    throttle.cancel()
    await asyncio.sleep(0.1)
    assert [e.progress for e in sent] == [0.1]
