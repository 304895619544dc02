"""A worker's shutdown ends even when the NATS client loses the cancel of its pull loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

from image_server.cluster.worker import Worker
from tests.cluster.conftest import cluster_config
from tests.natsproc import NatsServer


async def test_shutdown_ends_when_a_pull_answers_instead_of_being_cancelled(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    # nats-py's next_msg waits in a task of its own: on Python 3.11 a reply that lands in the
    # tick of the cancel is returned and the cancel is lost. A pull loop that ended only on
    # cancel then held shutdown forever (a suite run hung in a cluster test's teardown).
    worker = Worker(cluster_config(tmp_path, nats_server, name="w1"), worker_id="w1")
    await worker.start()
    pulling = asyncio.Event()
    lose_cancels = True

    async def next_pull(*, timeout: float) -> None:
        pulling.set()
        try:
            await asyncio.sleep(timeout)  # nothing queued: the pull times out
        except asyncio.CancelledError:
            if not lose_cancels:
                raise
        return None  # or the "no messages" reply won the race against the cancel

    for puller in worker._pullers:
        puller.next = next_pull  # type: ignore[method-assign]
        puller.maybe_work = True
    worker._work.set()
    await pulling.wait()
    stopping = asyncio.create_task(worker.shutdown())
    try:
        done, _ = await asyncio.wait({stopping}, timeout=5)
    finally:
        lose_cancels = False  # a loop still running ends when the test's loop closes
    assert stopping in done, "shutdown still waits for a pull loop that lost its cancel"
    assert not worker.in_flight
