"""Fixtures for distributed mode: a real nats-server, gateways and workers in this process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio

from image_server.client import RenderClient
from image_server.cluster.roles import gateway_service
from image_server.cluster.worker import Worker
from image_server.config import ServiceConfig
from image_server.generators.base import Generator, GeneratorConfig
from image_server.manager import GeneratorManager
from image_server.service import ImageService
from tests.conftest import make_config
from tests.natsproc import NatsServer, start_nats
from tests.procs import Procs


@pytest.fixture
async def nats_server(procs: Procs, tmp_path: Path) -> NatsServer:
    return await start_nats(procs, "nats", tmp_path / "jetstream")


def cluster_table(servers: list[str], **overrides: Any) -> dict[str, Any]:
    """A [cluster] table with test timings: short ack wait, quick worker heartbeats."""
    return {
        "backend": "nats",
        "servers": servers,
        "ack_wait_s": 2.0,
        "max_deliver": 3,
        "worker_heartbeat_s": 0.5,
        "worker_concurrency": 4,
        **overrides,
    }


def cluster_config(
    tmp_path: Path, server: NatsServer, *, name: str = "gw", cluster: dict[str, Any] | None = None, **overrides: Any
) -> ServiceConfig:
    return make_config(
        tmp_path / name,
        service_id=name,
        cluster=cluster_table([server.url], **(cluster or {})),
        **overrides,
    )


class Deployment:
    """Gateways and workers started in this process; all stopped at the end of the test."""

    def __init__(self, tmp_path: Path, server: NatsServer, context: zmq.asyncio.Context, stack: AsyncExitStack) -> None:
        self.tmp_path = tmp_path
        self.server = server
        self.context = context
        self.stack = stack

    async def gateway(self, name: str = "gw", **overrides: Any) -> ImageService:
        config = cluster_config(self.tmp_path, self.server, name=name, **overrides)
        return await self.stack.enter_async_context(gateway_service(config, context=self.context))

    async def worker(self, name: str = "w1", **overrides: Any) -> Worker:
        config = cluster_config(self.tmp_path, self.server, name=name, **overrides)
        return await self.stack.enter_async_context(Worker(config, worker_id=name))

    async def client(self, gateway: ImageService, **options: Any) -> RenderClient:
        client = RenderClient(
            gateway.endpoints["requests"], gateway.endpoints["events"], context=self.context, **options
        )
        return await self.stack.enter_async_context(client)


@pytest.fixture
async def deployment(
    tmp_path: Path, nats_server: NatsServer, context: zmq.asyncio.Context
) -> AsyncIterator[Deployment]:
    async with AsyncExitStack() as stack:
        yield Deployment(tmp_path, nats_server, context, stack)
    leftovers = [t for t in asyncio.all_tasks() if t.get_name().startswith(("job", "pull", "admit:", "receive"))]
    assert not leftovers, f"tasks left after shutdown: {leftovers}"


@pytest.fixture
async def service_factory(
    tmp_path: Path, context: zmq.asyncio.Context, nats_server: NatsServer
) -> AsyncIterator[Callable[..., Any]]:
    """The single-process tests' ``service_factory``, in distributed mode: a gateway (the
    service the test talks to) and a worker with its own NATS connection, same config."""

    @asynccontextmanager
    async def make(
        *, factory: Callable[[str, GeneratorConfig], Generator] | None = None, **overrides: Any
    ) -> AsyncIterator[ImageService]:
        config = make_config(tmp_path, cluster=cluster_table([nats_server.url]), **overrides)

        def manager() -> GeneratorManager | None:
            if factory is None:
                return None
            return GeneratorManager(
                config.generators,
                default=config.default_generator,
                factory=factory,
                max_in_flight=config.limits.max_in_flight,
                cache_size=config.limits.cache_size,
            )

        async with (
            Worker(config, manager=manager(), worker_id="w1"),
            gateway_service(config, context=context, manager=manager()) as service,
        ):
            yield service

    yield make
