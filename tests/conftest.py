"""Shared fixtures: fresh ZMQ contexts, a running service on ephemeral ports, clients."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from image_server.client import RenderClient
from image_server.config import ServiceConfig, build_config
from image_server.generators.base import Generator, GeneratorConfig
from image_server.manager import GeneratorManager
from image_server.service import ImageService
from schemas import ServiceStatus, StatusRequest, decode_frames, encode_message
from tests.procs import Procs, running_procs

# No test reaches a model hub: huggingface_hub reads these when it is first imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

LOOPBACK = {
    "requests": {"kind": "sub", "bind": "tcp://127.0.0.1:0"},
    "events": {"kind": "xpub", "bind": "tcp://127.0.0.1:0"},
}


@pytest.fixture
async def procs(tmp_path: Path) -> AsyncIterator[Procs]:
    """Service (and other) subprocesses started through ``tests.procs``, all stopped after."""
    async with running_procs(tmp_path) as started:
        yield started


@pytest.fixture
async def context() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


def make_config(tmp_path: Path, **overrides: Any) -> ServiceConfig:
    data: dict[str, Any] = {
        "service_id": "test-service",
        "output_dir": str(tmp_path / "output"),
        "state_dir": str(tmp_path / "state"),
        "heartbeat_interval_s": 0.2,
        "shutdown_timeout_s": 2.0,
        "sockets": LOOPBACK,
        "generators": {"mock": {"strategy": "mock"}},
    }
    data.update(overrides)
    return build_config(data)


ServiceFactory = Callable[..., Any]


@pytest.fixture
async def service_factory(tmp_path: Path, context: zmq.asyncio.Context) -> AsyncIterator[ServiceFactory]:
    """``async with service_factory(**config_overrides, factory=...) as service:``"""

    @asynccontextmanager
    async def make(
        *, factory: Callable[[str, GeneratorConfig], Generator] | None = None, **overrides: Any
    ) -> AsyncIterator[ImageService]:
        config = make_config(tmp_path, **overrides)
        manager = None
        if factory is not None:
            manager = GeneratorManager(
                config.generators,
                default=config.default_generator,
                factory=factory,
                max_in_flight=config.limits.max_in_flight,
                cache_size=config.limits.cache_size,
            )
        service = ImageService(config, context=context, manager=manager)
        async with service:
            yield service
        leftovers = [t for t in asyncio.all_tasks() if t.get_name().startswith(("render:", "receive", "heartbeat"))]
        assert not leftovers, f"tasks left after shutdown: {leftovers}"

    yield make


@pytest.fixture
async def client_for(context: zmq.asyncio.Context) -> AsyncIterator[Callable[..., Any]]:
    """``async with client_for(service) as client:`` a RenderClient on the service's endpoints."""

    @asynccontextmanager
    async def make(service: ImageService, **kwargs: Any) -> AsyncIterator[RenderClient]:
        async with RenderClient(
            service.endpoints["requests"], service.endpoints["events"], context=context, **kwargs
        ) as client:
            await client.wait_ready(5)
            yield client

    yield make


class RawPeer:
    """A bare PUB (to the service) and SUB (to everything it publishes), for hostile input."""

    def __init__(self, context: zmq.asyncio.Context, service: ImageService) -> None:
        self.pub = context.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.connect(service.endpoints["requests"])
        self.sub = context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(service.endpoints["events"])

    async def ready(self) -> None:
        """Probe with StatusRequests until one is answered (both directions are joined)."""
        probe = f"probe-{uuid.uuid4().hex[:8]}"
        async with asyncio.timeout(5):
            while True:
                await self.pub.send_multipart(encode_message(StatusRequest(request_id=probe)))
                if await self._saw_status(probe, 0.05):
                    break
        await self.drain()

    async def _saw_status(self, probe: str, wait: float) -> bool:
        while await self.sub.poll(int(wait * 1000)):
            message = decode_frames(await self.sub.recv_multipart()).message
            if isinstance(message, ServiceStatus) and message.request_id == probe:
                return True
        return False

    async def drain(self) -> None:
        while await self.sub.poll(20):
            await self.sub.recv_multipart()

    async def send(self, frames: list[bytes]) -> None:
        await self.pub.send_multipart(frames)

    async def next_event(self, predicate: Callable[[Any], bool], timeout: float = 5.0) -> Any:
        """The next decoded event matching ``predicate`` (others are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                frames = await self.sub.recv_multipart()
                decoded = decode_frames(frames)
                if predicate(decoded.message):
                    return decoded

    def close(self) -> None:
        self.pub.close(0)
        self.sub.close(0)


@pytest.fixture
async def raw_peer(context: zmq.asyncio.Context) -> AsyncIterator[Callable[[ImageService], Any]]:
    peers: list[RawPeer] = []

    async def make(service: ImageService) -> RawPeer:
        peer = RawPeer(context, service)
        peers.append(peer)
        await peer.ready()
        return peer

    yield make
    for peer in peers:
        peer.close()
