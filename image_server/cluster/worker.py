"""``image-server worker``: pull requests from JetStream and render them; no ZMQ sockets.

Higher priority bands are pulled first. A worker takes a request only when it has a free
slot (``cluster.worker_concurrency``), so requests wait in the stream, where any worker
can take them, rather than behind a busy one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import httpx
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext

from image_server.cluster import names
from image_server.cluster.connection import Cluster, open_cluster
from image_server.cluster.jobs import Jobs
from image_server.config import ServiceConfig
from image_server.generators.base import GeneratedImage
from image_server.manager import GeneratorManager
from image_server.pipeline import RenderPipeline
from image_server.storage import OutputStore, StoredImage
from schemas import DeliveryMode, RenderRequest, WorkerStatus

logger = logging.getLogger(__name__)

# An idle worker pulls when a gateway says work was queued; this catches what no notice
# announces (redeliveries after a dead worker's ack wait).
IDLE_POLL_S = 0.5
NO_WAIT = json.dumps({"batch": 1, "no_wait": True}).encode()


class FramesStore(OutputStore):
    """Every image comes back as bytes: the gateway delivers it as the request asked."""

    def store(
        self,
        request: RenderRequest,
        generator: str,
        images: Sequence[GeneratedImage],
        *,
        project: str,
        parameters: Mapping[str, Any],
        now: datetime | None = None,
        delivery: DeliveryMode | None = None,
    ) -> list[StoredImage]:
        return super().store(
            request, generator, images, project=project, parameters=parameters, now=now, delivery="frames"
        )


class BandPuller:
    """Pull one request at a time from a band's consumer, answering "none" at once when it
    is empty (``no_wait``). A delivered message arrives under its own subject, so it
    cannot come back as a plain request's reply: it lands on this puller's inbox."""

    def __init__(self, nc: NATS, band: str, inbox: Subscription) -> None:
        self.nc = nc
        self.band = band
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{names.REQUESTS_STREAM}.{names.consumer_name(band)}"
        self.inbox = inbox
        # Whether a pull may find something: false after "none", true again on a gateway's
        # notice for this band or after an idle poll. Spares an idle worker a round trip per
        # empty band on each new request.
        self.maybe_work = True
        self._notices = 0

    def notice(self) -> None:
        self._notices += 1
        self.maybe_work = True

    @classmethod
    async def open(cls, nc: NATS, band: str) -> BandPuller:
        return cls(nc, band, await nc.subscribe(nc.new_inbox()))

    async def next(self, *, timeout: float) -> Msg | None:
        notices = self._notices
        await self.nc.publish(self.subject, NO_WAIT, reply=self.inbox.subject)
        try:
            msg = await self.inbox.next_msg(timeout=timeout)
        except NatsTimeout:
            return None
        # A late answer to an earlier pull may come first: a message is taken either way,
        # and a status ("404 No Messages", "408 Request Timeout") only means none this time.
        if JetStreamContext.is_status_msg(msg) is None:
            return msg
        if notices == self._notices:  # no notice came while we asked
            self.maybe_work = False
        return None


def default_worker_id(config: ServiceConfig) -> str:
    return f"{config.service_id}-{socket.gethostname()}-{os.getpid()}"


class Worker:
    """``await worker.run()``, or ``async with worker:`` in tests."""

    def __init__(
        self, config: ServiceConfig, *, manager: GeneratorManager | None = None, worker_id: str | None = None
    ) -> None:
        self.config = config
        self.worker_id = worker_id or default_worker_id(config)
        self.manager = manager or GeneratorManager(
            config.generators,
            default=config.default_generator,
            cache_size=config.limits.cache_size,
            max_in_flight=config.limits.max_in_flight,
        )
        self.counters: Counter[str] = Counter()
        self._slots = asyncio.Semaphore(config.cluster.worker_concurrency)
        self._work = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stack = contextlib.AsyncExitStack()
        self._loops: list[asyncio.Task[None]] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._started_at = time.monotonic()
        self._cluster: Cluster | None = None
        self._jobs: Jobs | None = None
        self._pullers: list[BandPuller] = []

    @property
    def jobs(self) -> Jobs:
        assert self._jobs is not None, "worker not started"
        return self._jobs

    async def start(self) -> None:
        stack = self._stack
        cluster = self._cluster = await stack.enter_async_context(
            open_cluster(self.config.cluster, name=f"worker {self.worker_id}")
        )
        await stack.enter_async_context(self.manager)
        http_client = await stack.enter_async_context(httpx.AsyncClient(follow_redirects=False))
        pipeline = RenderPipeline(
            self.manager,
            FramesStore(self.config.output_dir, png_compress_level=self.config.png_compress_level),
            self.config.references,
            default_project=self.config.default_project,
            http_client=http_client,
        )
        self._jobs = Jobs(cluster, pipeline, self.config.default_project, self.counters)

        async def on_control(msg: Msg) -> None:
            with contextlib.suppress(ValueError):
                self.jobs.on_control(json.loads(msg.data))

        async def on_work(msg: Msg) -> None:
            for puller in self._pullers:
                if puller.band == msg.data.decode():
                    puller.notice()
            self._work.set()

        self._pullers = [await BandPuller.open(cluster.nc, band) for band in names.BANDS]
        await cluster.nc.subscribe(names.CONTROL_NOTICE, cb=on_control)
        await cluster.nc.subscribe(names.WORK_NOTICE, cb=on_work)
        self._started_at = time.monotonic()
        self._loops = [
            asyncio.create_task(self._pull_loop(cluster), name="pull"),
            asyncio.create_task(self._heartbeat_loop(cluster), name="worker-heartbeat"),
        ]
        logger.info("worker %s pulling from %s", self.worker_id, ", ".join(self.config.cluster.servers))

    async def run(self) -> None:
        await self.start()
        try:
            await self._stopping.wait()
        finally:
            await self.shutdown()

    def stop(self) -> None:
        self._stopping.set()

    async def shutdown(self) -> None:
        """Stop pulling, let running requests finish up to the deadline, hand back the rest."""
        self._stopping.set()
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._handlers:
            logger.info("draining %d request(s) for up to %.1fs", len(self._handlers), self.config.shutdown_timeout_s)
            _, pending = await asyncio.wait(self._handlers, timeout=self.config.shutdown_timeout_s)
            for task in pending:
                task.cancel()  # each naks its request, so another worker takes it at once
            await asyncio.gather(*pending, return_exceptions=True)
        if self._cluster is not None:
            with contextlib.suppress(Exception):
                await self._cluster.workers.delete(names.token(self.worker_id))
        await self._stack.aclose()
        logger.info("worker stopped")

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    @property
    def in_flight(self) -> int:
        return len(self._handlers)

    # -- loops ------------------------------------------------------------------------

    # Both loops also end on ``_stopping``, not only on cancel: nats-py can turn a cancel
    # into a result or an error (on Python 3.11 ``wait_for`` inside ``next_msg`` returns a
    # message that arrived as it was cancelled; a closed connection raises
    # ConnectionClosedError), and a loop that went on would hold ``shutdown`` forever.
    async def _pull_loop(self, cluster: Cluster) -> None:
        while not self._stopping.is_set():
            await self._slots.acquire()
            self._work.clear()
            try:
                msg = await self._next(cluster)
            except Exception as exc:  # NATS unreachable for now: the client reconnects by itself
                logger.warning("pulling failed: %r", exc)
                msg = None
            if msg is None:
                self._slots.release()
                try:
                    async with asyncio.timeout(IDLE_POLL_S):
                        await self._work.wait()
                except TimeoutError:
                    for puller in self._pullers:
                        puller.maybe_work = True  # redeliveries come with no notice
                continue
            task = asyncio.create_task(self._handle(msg), name="job")
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _next(self, cluster: Cluster) -> Msg | None:
        """The next request, highest band first, without waiting for one."""
        for puller in self._pullers:
            if puller.maybe_work and not self._stopping.is_set():
                msg = await puller.next(timeout=cluster.config.connect_timeout_s)
                if msg is not None:
                    return msg
        return None

    async def _handle(self, msg: Msg) -> None:
        try:
            await self.jobs.handle(msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The request is not acked: JetStream redelivers it after the ack wait.
            logger.exception("handling a delivered request failed")
        finally:
            self._slots.release()

    async def _heartbeat_loop(self, cluster: Cluster) -> None:
        host = socket.gethostname()
        key = names.token(self.worker_id)
        while not self._stopping.is_set():
            beat = WorkerStatus(
                worker_id=self.worker_id,
                host=host,
                generators=self.manager.available(),
                in_flight=self.in_flight,
                concurrency=self.config.cluster.worker_concurrency,
                uptime_s=round(time.monotonic() - self._started_at, 3),
            )
            try:
                await cluster.workers.put(key, beat.model_dump_json().encode())
            except Exception as exc:
                logger.warning("worker heartbeat failed: %r", exc)
            await asyncio.sleep(self.config.cluster.worker_heartbeat_s)
