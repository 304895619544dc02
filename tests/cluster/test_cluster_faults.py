"""Losing a worker, a NATS node or the gateway mid-run: nothing accepted is lost, nothing is
answered twice. Every process is real (nats-server, gateway and workers as subprocesses);
each is SIGKILLed, so no shutdown code runs."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio

from image_server.client import RenderClient, RenderFailed, RenderResult
from schemas import ImageReady, RenderError, RenderProgress
from tests.cluster.conftest import cluster_table
from tests.natsproc import start_nats, start_nats_cluster
from tests.procs import Procs, ServiceProc, write_config

pytestmark = pytest.mark.slow

LOOPBACK_BINDS = {"requests": "tcp://127.0.0.1:0", "events": "tcp://127.0.0.1:0"}


def role_config(tmp_path: Path, name: str, servers: list[str], *, delay_s: float, **cluster: Any) -> Path:
    return write_config(
        tmp_path / f"{name}.toml",
        service_id=name,
        state_dir=tmp_path / name / "state",
        output_dir=tmp_path / name / "output",
        heartbeat_interval_s=0.2,
        sockets={
            "requests": {"kind": "sub", "bind": "tcp://127.0.0.1:0"},
            "events": {"kind": "xpub", "bind": "tcp://127.0.0.1:0"},
        },
        mock={"delay_s": delay_s, "concurrency": 4},
        cluster=cluster_table(servers, **cluster),
    )


class Run:
    """Many requests through one RenderClient; every terminal event seen on the wire counted."""

    def __init__(self, client: RenderClient) -> None:
        self.client = client
        self.terminal: Counter[str] = Counter()
        self.finished = 0
        self._progress = asyncio.Event()
        client.on_event = self._on_event

    def _on_event(self, event: Any) -> None:
        if isinstance(event, ImageReady | RenderError):
            self.terminal[event.request_id] += 1
            self.finished += 1
            self._progress.set()

    async def reach(self, count: int, timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout):
            while self.finished < count:
                self._progress.clear()
                await self._progress.wait()

    async def render_all(self, ids: list[str], timeout: float = 120.0) -> list[RenderResult]:
        async def one(rid: str) -> RenderResult:
            return await self.client.render(request_id=rid, prompt=rid, width=64, height=64, timeout=timeout)

        return list(await asyncio.gather(*(one(rid) for rid in ids)))


def assert_answered_once(run: Run, ids: list[str], results: list[RenderResult]) -> None:
    assert len(results) == len(ids)  # every render() returned an ImageReady: none lost
    assert sorted(run.terminal) == sorted(ids)
    assert max(run.terminal.values()) == 1, [rid for rid, n in run.terminal.items() if n > 1]
    assert run.client.duplicates == 0
    for result in results:
        image = result.event.images[0]
        assert image.path is not None
        assert hashlib.sha256(Path(image.path).read_bytes()).hexdigest() == image.sha256


async def during(run: Run, steps: list[tuple[int, Callable[[], Awaitable[object]]]]) -> None:
    """After ``count`` terminal events, do ``action`` (kill or restart something)."""
    for count, action in steps:
        await run.reach(count)
        await action()


async def test_three_workers_losing_one_twice_lose_and_repeat_nothing(
    procs: Procs, tmp_path: Path, context: zmq.asyncio.Context
) -> None:
    server = await start_nats(procs, "nats", tmp_path / "js")
    servers = [server.url]
    gateway = await procs.gateway("gw", role_config(tmp_path, "gw", servers, delay_s=0.05), binds=LOOPBACK_BINDS)
    victim_config = role_config(tmp_path, "w2", servers, delay_s=0.05)
    for name in ("w1", "w2", "w3"):
        await procs.worker(name, role_config(tmp_path, name, servers, delay_s=0.05))
    victim = [proc for proc in procs.started if proc.name == "w2"][-1]
    ids = [f"req-{index:04d}" for index in range(600)]

    async def kill_and_restart() -> None:
        await [proc for proc in procs.started if proc.name == "w2" and proc.running][-1].kill()
        await procs.worker("w2", victim_config)

    async with RenderClient(gateway.endpoints["requests"], gateway.endpoints["events"], context=context) as client:
        run = Run(client)
        rendering = asyncio.ensure_future(run.render_all(ids))
        await during(run, [(100, kill_and_restart), (300, kill_and_restart)])
        results = await rendering
    assert_answered_once(run, ids, results)
    assert victim.process is not None and victim.process.returncode == -9


async def test_losing_one_of_three_nats_nodes_loses_nothing(
    procs: Procs, tmp_path: Path, context: zmq.asyncio.Context
) -> None:
    nodes = await start_nats_cluster(procs, tmp_path / "js")
    servers = [node.url for node in nodes]
    gateway = await procs.gateway(
        "gw", role_config(tmp_path, "gw", servers, delay_s=0.02, replicas=3), binds=LOOPBACK_BINDS
    )
    for name in ("w1", "w2"):
        await procs.worker(name, role_config(tmp_path, name, servers, delay_s=0.02, replicas=3))
    ids = [f"req-{index:04d}" for index in range(200)]

    async def kill_a_node() -> None:
        await nodes[1].kill()

    async with RenderClient(gateway.endpoints["requests"], gateway.endpoints["events"], context=context) as client:
        run = Run(client)
        rendering = asyncio.ensure_future(run.render_all(ids))
        await during(run, [(60, kill_a_node)])
        results = await rendering
    assert_answered_once(run, ids, results)


async def test_a_gateway_restart_mid_run_answers_every_request_once(
    procs: Procs, tmp_path: Path, context: zmq.asyncio.Context
) -> None:
    server = await start_nats(procs, "nats", tmp_path / "js")
    servers = [server.url]
    config = role_config(tmp_path, "gw", servers, delay_s=0.05)
    gateway = await procs.gateway("gw", config, binds=LOOPBACK_BINDS)
    for name in ("w1", "w2"):
        await procs.worker(name, role_config(tmp_path, name, servers, delay_s=0.05))
    ids = [f"req-{index:04d}" for index in range(200)]

    async def restart_gateway() -> None:
        await gateway.kill()
        again: ServiceProc = await procs.gateway("gw", config, binds=gateway.endpoints)
        assert again.endpoints == gateway.endpoints

    async with RenderClient(gateway.endpoints["requests"], gateway.endpoints["events"], context=context) as client:
        run = Run(client)
        rendering = asyncio.ensure_future(run.render_all(ids))
        await during(run, [(50, restart_gateway)])
        results = await rendering
    # The client sees each request answered once (RenderClient keeps the first answer).
    assert len(results) == len(ids)
    assert {result.event.request_id for result in results} == set(ids)
    for result in results:
        image = result.event.images[0]
        assert image.path is not None
        assert hashlib.sha256(Path(image.path).read_bytes()).hexdigest() == image.sha256


async def test_a_request_whose_workers_keep_dying_ends_with_an_internal_error(
    procs: Procs, tmp_path: Path, context: zmq.asyncio.Context
) -> None:
    server = await start_nats(procs, "nats", tmp_path / "js")
    limits = {"max_deliver": 1, "ack_wait_s": 1.0}
    gateway = await procs.gateway(
        "gw", role_config(tmp_path, "gw", [server.url], delay_s=0, **limits), binds=LOOPBACK_BINDS
    )
    first = await procs.worker("w1", role_config(tmp_path, "w1", [server.url], delay_s=0, **limits))
    started = asyncio.Event()

    def on_event(event: Any) -> None:
        if isinstance(event, RenderProgress) and event.stage == "started":
            started.set()

    async with RenderClient(
        gateway.endpoints["requests"], gateway.endpoints["events"], context=context, on_event=on_event
    ) as client:
        poison = asyncio.ensure_future(
            client.render(
                request_id="poison", prompt="x", width=64, height=64, generator_config={"delay_s": 60}, timeout=30
            )
        )
        async with asyncio.timeout(15):
            await started.wait()
        await first.kill()  # dies holding its only allowed delivery
        await procs.worker("w2", role_config(tmp_path, "w2", [server.url], delay_s=0, **limits))
        with pytest.raises(RenderFailed) as failed:
            await poison
    assert failed.value.code == "internal"
    assert "delivered 1 times without finishing" in failed.value.event.message
