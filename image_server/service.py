"""ImageService: sockets, receive loop, dispatch, heartbeats, status and shutdown.

The receive loop never awaits a render: each accepted request runs as its own task,
owned here and keyed by request id, and ends in exactly one terminal event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, Self

import httpx
import zmq
import zmq.asyncio

from image_server.active import Active
from image_server.assembly import frugal_pipeline
from image_server.audience import Audience
from image_server.compat import PlainJsonPublisher, make_publisher
from image_server.config import ServiceConfig
from image_server.errors import ConfigError
from image_server.frugal import FrugalPipeline
from image_server.health import ServiceProbe
from image_server.httpcount import counting_http_responses
from image_server.identity import Ticket, curve_user_id, owner_key
from image_server.journal import Journal
from image_server.lifecycle import RequestTracker
from image_server.logs import RateLimitedLog
from image_server.looplag import LoopLagMonitor
from image_server.manager import GeneratorManager
from image_server.metrics import ServiceMetrics
from image_server.offload import (
    DECODE_IN_THREAD_BYTES,
    as_bytes_in_chunks,
    prestart_worker_threads,
    run_gil_bound,
)
from image_server.outbox import Outbox
from image_server.pipeline import RenderPipeline
from image_server.publisher import EventPublisher
from image_server.security import curve_setup
from image_server.shutdown import ShutdownSummary, drain
from image_server.sockets import bound_endpoint, open_socket
from image_server.statelock import StateLock
from image_server.status_report import service_status
from image_server.storage import OutputStore
from image_server.version import VERSION
from schemas import (
    CancelRequest,
    ClusterStatus,
    Heartbeat,
    RenderError,
    RenderRequest,
    ServiceStatus,
    StatusRequest,
    WireError,
    decode_frames,
    sniff_field,
)

if TYPE_CHECKING:
    from image_server.console import Console
    from image_server.web import HttpServer

logger = logging.getLogger(__name__)


class Frontend(Protocol):
    """Where requests go instead of this process's tracker and journal: distributed mode's
    gateway (image_server.cluster.gateway), handed in by whoever builds the service, so this
    module never imports the cluster package."""

    async def __aenter__(self) -> Self: ...
    async def __aexit__(self, *exc_info: object) -> None: ...
    async def on_render(
        self, request: RenderRequest, frames: Sequence[bytes | bytearray], raw: bytes | bytearray | None, owner: str
    ) -> None: ...
    async def cancel(self, request_id: str, owner: str) -> bool: ...
    async def refuse(self, ticket: Ticket, event: RenderError) -> None: ...
    async def status(self) -> ClusterStatus: ...


FrontendFactory = Callable[[ServiceConfig, RenderPipeline, EventPublisher, "Counter[str]"], Frontend]


class ImageService:
    """Serve until stopped: ``await service.run()``, or ``async with service:`` in tests."""

    def __init__(
        self,
        config: ServiceConfig,
        *,
        context: zmq.asyncio.Context | None = None,
        manager: GeneratorManager | None = None,
        store: OutputStore | None = None,
        handle_signals: bool = False,
        frontend: FrontendFactory | None = None,
    ) -> None:
        if config.cluster.enabled and frontend is None:
            raise ConfigError(
                "[cluster] is set: build the gateway with image_server.cluster.roles.gateway_service "
                "(or run `image-server gateway`)"
            )
        self.config = config
        self._frontend_factory = frontend
        self._own_context = context is None
        self.context = context or zmq.asyncio.Context()
        self.manager = manager or GeneratorManager(
            config.generators,
            default=config.default_generator,
            cache_size=config.limits.cache_size,
            max_in_flight=config.limits.max_in_flight,
        )
        self.store = store or OutputStore(config.output_dir, png_compress_level=config.png_compress_level)
        self.handle_signals = handle_signals
        self.counters: Counter[str] = Counter()
        self.endpoints: dict[str, str] = {}
        self._tracker: RequestTracker | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stack = contextlib.AsyncExitStack()
        # A hostile peer must not be able to flood the log with one line per bad message.
        self._refusals = RateLimitedLog(logger, per_interval=20, interval_s=10.0)
        self._stopping = asyncio.Event()
        self._stop_now = asyncio.Event()  # a second signal: leave the rest for the next start
        self.metrics = ServiceMetrics(enabled=config.http.enabled)
        self.loop_lag = LoopLagMonitor()
        self.http: HttpServer | None = None
        self.console: Console | None = None
        self._started_at = time.monotonic()
        self._publisher: EventPublisher | None = None
        self._request_socket: zmq.asyncio.Socket | None = None
        self._curve = False
        self.audience = Audience()
        self._pipeline: FrugalPipeline | None = None
        self.journal: Journal | None = None
        self._gateway: Frontend | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Open sockets and the manager, start the loops. Returns once serving; on failure
        whatever was opened is closed again."""
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise

    async def _start(self) -> None:
        stack = self._stack
        if self.config.journal.enabled and self._frontend_factory is None:
            # Before anything is bound: a second service on this journal must change nothing.
            lock = StateLock(self.config.state_dir)
            lock.acquire()
            stack.callback(lock.release)
        if self._own_context:
            stack.callback(self.context.destroy, 0)
        curve, server_key = curve_setup(self.config.security, self.context, stack)
        self._curve = curve is not None
        # Libzmq's own cap drops (with a disconnect) anything far over our limit before it is
        # buffered; messages between the two limits get a RenderError from _on_frames.
        self._request_socket = open_socket(
            self.context,
            self.config.sockets.requests,
            role="requests",
            curve=curve,
            curve_server_key=server_key,
            max_message_bytes=2 * self.config.limits.max_message_bytes,
        )
        stack.callback(self._request_socket.close, 0)
        events = open_socket(
            self.context, self.config.sockets.events, role="events", curve=curve, curve_server_key=server_key
        )
        stack.callback(events.close, 0)
        for role, socket in (("requests", self._request_socket), ("events", events)):
            if getattr(self.config.sockets, role).bind:
                self.endpoints[role] = bound_endpoint(socket)
        # Only an XPUB reports subscriptions (read by the subscription loop started below).
        audience = self.audience if self.config.sockets.events.kind == "xpub" else None
        self._publisher = make_publisher(events, self.config, observer=self.metrics.observe, audience=audience)
        await stack.enter_async_context(self.manager)
        await self.manager.preload()  # a model that does not load fails the start (exit 3)
        http_client = await stack.enter_async_context(httpx.AsyncClient(follow_redirects=False))
        self._pipeline = await frugal_pipeline(self.config, self.manager, self.store, http_client, stack)
        if self._frontend_factory is not None:
            # Distributed mode: JetStream holds requests and results; this process is a gateway.
            self._gateway = await stack.enter_async_context(
                self._frontend_factory(self.config, self._pipeline, self._publisher, self.counters)
            )
        elif self.config.journal.enabled:
            journal_config = self.config.journal
            self.journal = await stack.enter_async_context(
                Journal(
                    self.config.state_dir,
                    retention_s=journal_config.retention_s,
                    failed_body_retention_s=journal_config.failed_body_retention_s,
                    max_bytes=journal_config.max_bytes,
                )
            )
            await self.journal.size()
        outbox = Outbox(
            self._publisher,
            self.journal,
            self.counters,
            audience=self.audience,
            resume_grace_s=self.config.journal.resume_grace_s,
        )
        self._tracker = RequestTracker(
            self._pipeline, outbox, self.config.limits, self.config.references, self.counters
        )
        if isinstance(self._publisher, PlainJsonPublisher) and self.journal is not None:
            for entry in await self.journal.unfinished():  # their echoed fields, after a restart
                self._publisher.remember(entry.request_json)
        await self.tracker.resume()
        await prestart_worker_threads()
        self._started_at = time.monotonic()
        self._tasks = [asyncio.create_task(self._receive_loop(), name="receive")]
        self._tasks.append(asyncio.create_task(self.loop_lag.run(), name="loop-lag"))
        if self.config.http.enabled:
            await self._start_http(stack)
        if self.journal is not None:
            self._tasks.append(asyncio.create_task(self._prune_loop(self.journal), name="prune"))
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeat"))
        if self.config.sockets.events.kind == "xpub":
            self._tasks.append(asyncio.create_task(self._subscription_loop(events), name="subscriptions"))
        if self.handle_signals:
            self._install_signal_handlers()
        logger.info("serving: %s", ", ".join(f"{k} {v}" for k, v in self.endpoints.items()) or "connected sockets")

    async def _start_http(self, stack: contextlib.AsyncExitStack) -> None:
        stack.enter_context(counting_http_responses(self.metrics.http_responses))
        probe = ServiceProbe(
            serving=lambda: bool(self._tasks) and not self._stopping.is_set(),
            pipeline=self.pipeline,
            journal=self.journal,
            output_dir=self.config.output_dir,
            counters=self.counters,
            lag=self.loop_lag,
            max_loop_lag_s=self.config.http.max_loop_lag_s,
            metrics=self.metrics,
        )
        console, mount = None, None
        if self.config.console.enabled:
            from image_server.console.mount import build_console  # only when configured: pages, thumbnails

            console, mount = build_console(self.config, self.endpoints, self.context)
        # aiohttp loads only when the HTTP listener is configured (it is off by default).
        from image_server.web.health import health_server

        self.http = await stack.enter_async_context(health_server(self.config.http, probe, extra_routes=mount))
        self.endpoints["http"] = self.http.url
        if console is not None:
            await console.start()
            # Closed before the HTTP server (the stack unwinds backwards): the console ends its
            # pages' event streams, which the server would otherwise wait for.
            stack.push_async_callback(console.aclose)
            self.console = console

    async def run(self) -> None:
        """Start, serve until ``stop()``, then shut down cleanly."""
        await self.start()
        await self.serve_until_stopped()

    async def serve_until_stopped(self) -> None:
        """After ``start()``: wait for ``stop()`` (or a signal), then shut down cleanly."""
        try:
            await self._stopping.wait()
        finally:
            await self.shutdown()

    def stop(self) -> None:
        """Ask the service to stop (safe from a signal handler or a test); asked a second
        time, stop at once without waiting for the renders in flight."""
        if self._stopping.is_set():
            self._stop_now.set()
        self._stopping.set()

    async def shutdown(self) -> None:
        """Stop intake, start nothing more from the queue, let running renders finish up to
        the deadline (or a second signal), leave the rest in the journal, close."""
        self._stopping.set()
        self.audience.close()  # resumed results held back for subscribers go out before the drain ends
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._tracker is not None:
            await drain(self.tracker, self.config.shutdown_timeout_s, self._stop_now)
            logger.info("%s", ShutdownSummary.of(self.tracker, self.metrics))
        await self._stack.aclose()
        logger.info("stopped")

    async def __aenter__(self) -> ImageService:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.stop)
            except NotImplementedError:  # pragma: no cover - Windows
                signal.signal(sig, lambda *_: loop.call_soon_threadsafe(self.stop))

    @property
    def publisher(self) -> EventPublisher:
        assert self._publisher is not None, "service not started"
        return self._publisher

    @property
    def tracker(self) -> RequestTracker:
        """The requests in flight and their lifecycle."""
        assert self._tracker is not None, "service not started"
        return self._tracker

    @property
    def active(self) -> dict[str, Active]:
        return self.tracker.active

    @property
    def pipeline(self) -> FrugalPipeline:
        assert self._pipeline is not None, "service not started"
        return self._pipeline

    # -- loops ------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self._request_socket is not None
        while True:
            # copy=False: a big message is copied out of libzmq off the loop (see _as_bytes).
            received = await self._request_socket.recv_multipart(copy=False)
            try:
                # With CURVE, the sender is the key the ZAP handler authenticated.
                user_id = curve_user_id(received[0]) if self._curve and received else None
                size = sum(len(frame) for frame in received)
                if size > DECODE_IN_THREAD_BYTES:
                    frames: list[bytes | bytearray] = await run_gil_bound(as_bytes_in_chunks, received)
                else:
                    frames = [frame.bytes for frame in received]
                await self._on_frames(frames, user_id=user_id)
            except Exception:
                # Never die on input: a bug handling one message must not stop the service.
                self.counters["internal_errors"] += 1
                logger.exception("unexpected error handling a message")

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._publish_heartbeat()
            await asyncio.sleep(self.config.heartbeat_interval_s)

    async def _subscription_loop(self, events: zmq.asyncio.Socket) -> None:
        """Greet each new subscriber that will see Heartbeats with one at once, and keep the
        audience (who listens to which topics) up to date for resumed results."""
        while True:
            frame = await events.recv()
            self.audience.observe(frame)
            if frame[:1] == b"\x01" and b"Heartbeat".startswith(frame[1:]):
                await self._publish_heartbeat()

    async def _publish_heartbeat(self) -> None:
        scheduler = self.manager.scheduler
        beat = Heartbeat(
            interval_s=self.config.heartbeat_interval_s,
            uptime_s=self.uptime_s,
            in_flight=scheduler.in_flight,
            queued=self.queued,
            version=VERSION,
        )
        await self.publisher.publish(beat)

    @property
    def uptime_s(self) -> float:
        return round(time.monotonic() - self._started_at, 3)

    @property
    def queued(self) -> int:
        return self.tracker.queued

    # -- inbound ----------------------------------------------------------------------

    async def _on_frames(self, frames: Sequence[bytes | bytearray], *, user_id: str | None = None) -> None:
        self.counters["received"] += 1
        size = sum(len(f) for f in frames)
        if size > self.config.limits.max_message_bytes:
            head = frames[1][:65536] if len(frames) > 1 else frames[0][:65536]
            limit = self.config.limits.max_message_bytes
            await self._refuse(
                WireError(
                    f"message of {size} bytes exceeds the limit of {limit}",
                    request_id=sniff_field(head, "request_id"),
                    reply_to=sniff_field(head, "reply_to"),
                ),
                user_id,
            )
            return
        try:
            decoded = (
                await run_gil_bound(decode_frames, frames) if size > DECODE_IN_THREAD_BYTES else decode_frames(frames)
            )
        except WireError as exc:
            await self._refuse(exc, user_id)
            return
        message = decoded.message
        if isinstance(message, RenderRequest):
            if isinstance(self._publisher, PlainJsonPublisher):
                self._publisher.remember(decoded.payload)
            frames = [blob if isinstance(blob, bytes | bytearray) else bytes(blob) for blob in decoded.blobs]
            if self._gateway is not None:
                owner = owner_key(user_id, message.reply_to)
                await self._gateway.on_render(message, frames, raw=decoded.payload, owner=owner)
            else:
                await self.tracker.on_render(message, raw=decoded.payload, frames=frames, user_id=user_id)
        elif isinstance(message, CancelRequest):
            await self._on_cancel(message, user_id)
        elif isinstance(message, StatusRequest):
            await self._on_status(message)
        else:
            rid = getattr(message, "request_id", None)
            await self._refuse(WireError(f"{message.type} is not a request", request_id=rid), user_id)

    async def _refuse(self, exc: WireError, user_id: str | None) -> None:
        """A message that could not be decoded: an error event if it names a request (and
        the id is not another request's: the Outbox checks)."""
        request_id = exc.request_id
        if request_id is None:
            self.counters["undecodable"] += 1
            self._refusals.warning("dropped undecodable message (%s)", exc.reason[:200])
            return
        self.counters["rejected"] += 1
        self._refusals.warning("rejected %s: %s", request_id, exc.reason[:200])
        ticket = Ticket(request_id, owner_key(user_id, exc.reply_to), exc.reply_to)
        code = "prompt_too_long" if exc.code == "prompt_too_long" else "invalid_request"
        refusal = RenderError(request_id=request_id, code=code, message=exc.reason)
        if self._gateway is not None:
            await self._gateway.refuse(ticket, refusal)
        else:
            self.tracker.refuse(ticket, refusal)

    async def _on_cancel(self, message: CancelRequest, user_id: str | None) -> None:
        if self._gateway is not None:
            found = await self._gateway.cancel(message.request_id, owner=owner_key(user_id, message.reply_to))
        else:
            found = self.tracker.cancel(message.request_id, reply_to=message.reply_to, user_id=user_id)
        if not found:
            logger.info("cancel for %s: not in flight for its sender", message.request_id)

    async def _on_status(self, message: StatusRequest) -> None:
        status = self.status(message.request_id)
        if self._gateway is not None:
            status = status.model_copy(update={"cluster": await self._gateway.status()})
        await self.publisher.publish(status, reply_to=message.reply_to)

    def status(self, request_id: str | None = None) -> ServiceStatus:
        return service_status(
            self.manager,
            self.pipeline,
            self.journal,
            request_id=request_id,
            queued=self.queued,
            uptime_s=self.uptime_s,
            counters=self.counters,
        )

    async def _prune_loop(self, journal: Journal) -> None:
        while True:
            removed = await journal.prune()
            await journal.size()
            if removed:
                logger.info("pruned %d finished journal entries", removed)
            await asyncio.sleep(self.config.journal.prune_interval_s)
