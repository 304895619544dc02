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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import zmq
import zmq.asyncio

from image_server.config import ServiceConfig
from image_server.errors import Cancelled, ImageServerError, Overloaded, Superseded
from image_server.journal import Admission as Recorded, Journal
from image_server.manager import GeneratorManager
from image_server.outcomes import error_event
from image_server.pipeline import Admission, RenderOutcome, RenderPipeline
from image_server.progress import ProgressThrottle
from image_server.publisher import EventPublisher
from image_server.security import KeyPair, load_keypair, load_public_key, start_authenticator
from image_server.sockets import bound_endpoint, open_socket
from image_server.storage import OutputStore
from schemas import (
    MESSAGE_ADAPTER,
    CancelRequest,
    GeneratorStatus,
    Heartbeat,
    ImageReady,
    RenderAccepted,
    RenderError,
    RenderProgress,
    RenderRequest,
    ServiceStatus,
    StatusRequest,
    WireError,
    decode_frames,
    sniff_field,
)

logger = logging.getLogger(__name__)

# Messages bigger than this are decoded on a worker thread: parsing megabytes of inline
# base64 JSON would otherwise stall the loop (and every heartbeat) for tens of ms.
DECODE_IN_THREAD_BYTES = 256 * 1024


@dataclass
class _Active:
    request: RenderRequest
    generator: str
    received_at: float
    task: asyncio.Task[None] | None = None
    accepted: bool = False  # journaled and RenderAccepted published
    end_reason: ImageServerError | None = None
    throttle: ProgressThrottle | None = None
    started: bool = False  # its task has begun to run, so cancelling it reaches its handlers


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
    ) -> None:
        self.config = config
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
        self._active: dict[str, _Active] = {}
        self._channels: dict[str, str] = {}
        self._per_client: Counter[str] = Counter()
        self._tasks: list[asyncio.Task[None]] = []
        self._stack = contextlib.AsyncExitStack()
        self._stopping = asyncio.Event()
        self._started_at = time.monotonic()
        self._publisher: EventPublisher | None = None
        self._requests: zmq.asyncio.Socket | None = None
        self._pipeline: RenderPipeline | None = None
        self.journal: Journal | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Open sockets and the manager, start the loops. Returns once serving."""
        stack = self._stack
        if self._own_context:
            stack.callback(self.context.destroy, 0)
        curve, server_key = self._curve_setup(stack)
        # Libzmq's own cap drops (with a disconnect) anything far over our limit before it is
        # buffered; messages between the two limits get a RenderError from _on_frames.
        self._requests = open_socket(
            self.context,
            self.config.sockets.requests,
            role="requests",
            curve=curve,
            curve_server_key=server_key,
            max_message_bytes=2 * self.config.limits.max_message_bytes,
        )
        stack.callback(self._requests.close, 0)
        events = open_socket(
            self.context, self.config.sockets.events, role="events", curve=curve, curve_server_key=server_key
        )
        stack.callback(events.close, 0)
        for role, socket in (("requests", self._requests), ("events", events)):
            if getattr(self.config.sockets, role).bind:
                self.endpoints[role] = bound_endpoint(socket)
        self._publisher = EventPublisher(events, service_id=self.config.service_id)
        await stack.enter_async_context(self.manager)
        http_client = await stack.enter_async_context(httpx.AsyncClient(follow_redirects=False))
        self._pipeline = RenderPipeline(
            self.manager,
            self.store,
            self.config.references,
            default_project=self.config.default_project,
            http_client=http_client,
        )
        if self.config.journal.enabled:
            self.journal = await stack.enter_async_context(
                Journal(self.config.state_dir, retention_s=self.config.journal.retention_s)
            )
            await self._resume()
        self._started_at = time.monotonic()
        self._tasks = [asyncio.create_task(self._receive_loop(), name="receive")]
        if self.journal is not None:
            self._tasks.append(asyncio.create_task(self._prune_loop(self.journal), name="prune"))
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeat"))
        if self.config.sockets.events.kind == "xpub":
            self._tasks.append(asyncio.create_task(self._subscription_loop(events), name="subscriptions"))
        if self.handle_signals:
            self._install_signal_handlers()
        logger.info("serving: %s", ", ".join(f"{k} {v}" for k, v in self.endpoints.items()) or "connected sockets")

    def _curve_setup(self, stack: contextlib.AsyncExitStack) -> tuple[KeyPair | None, bytes | None]:
        """Keys and a running ZAP authenticator when ``security.curve`` is on."""
        security = self.config.security
        if not security.curve:
            return None, None
        keys = load_keypair(security.secret_key)
        server_key = load_public_key(security.server_public_key) if security.server_public_key else None
        # The authenticator must be up before the sockets bind, or early clients go unchecked.
        authenticator = start_authenticator(self.context, security.authorized_keys)
        stack.callback(authenticator.stop)
        return keys, server_key

    async def run(self) -> None:
        """Start, serve until ``stop()``, then shut down cleanly."""
        await self.start()
        try:
            await self._stopping.wait()
        finally:
            await self.shutdown()

    def stop(self) -> None:
        """Ask the service to stop (safe from a signal handler or a test)."""
        self._stopping.set()

    async def shutdown(self) -> None:
        """Stop intake, drain in-flight work up to the deadline, cancel the rest, close."""
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        running = [a.task for a in self._active.values() if a.task is not None]
        if running:
            logger.info("draining %d request(s) for up to %.1fs", len(running), self.config.shutdown_timeout_s)
            _, pending = await asyncio.wait(running, timeout=self.config.shutdown_timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                logger.warning("%d request(s) unfinished at shutdown", len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        await self._stack.aclose()

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
    def pipeline(self) -> RenderPipeline:
        assert self._pipeline is not None, "service not started"
        return self._pipeline

    # -- loops ------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self._requests is not None
        while True:
            frames = await self._requests.recv_multipart()
            try:
                await self._on_frames(frames)
            except Exception:
                # Never die on input: a bug handling one message must not stop the service.
                self.counters["internal_errors"] += 1
                logger.exception("unexpected error handling a message")

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._publish_heartbeat()
            await asyncio.sleep(self.config.heartbeat_interval_s)

    async def _subscription_loop(self, events: zmq.asyncio.Socket) -> None:
        """Greet each new subscriber that will see Heartbeats with one at once."""
        while True:
            frame = await events.recv()
            if frame[:1] == b"\x01" and b"Heartbeat".startswith(frame[1:]):
                await self._publish_heartbeat()

    async def _publish_heartbeat(self) -> None:
        scheduler = self.manager.scheduler
        beat = Heartbeat(
            interval_s=self.config.heartbeat_interval_s,
            uptime_s=self.uptime_s,
            in_flight=scheduler.in_flight,
            queued=self.queued,
        )
        await self.publisher.publish(beat)

    @property
    def uptime_s(self) -> float:
        return round(time.monotonic() - self._started_at, 3)

    @property
    def queued(self) -> int:
        return len(self._active) - self.manager.scheduler.in_flight

    # -- inbound ----------------------------------------------------------------------

    async def _on_frames(self, frames: Sequence[bytes]) -> None:
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
                )
            )
            return
        try:
            decoded = (
                await asyncio.to_thread(decode_frames, frames)
                if size > DECODE_IN_THREAD_BYTES
                else decode_frames(frames)
            )
        except WireError as exc:
            await self._refuse(exc)
            return
        message = decoded.message
        if isinstance(message, RenderRequest):
            await self._on_render(message)
        elif isinstance(message, CancelRequest):
            await self._on_cancel(message)
        elif isinstance(message, StatusRequest):
            await self._on_status(message)
        else:
            rid = getattr(message, "request_id", None)
            await self._refuse(WireError(f"{message.type} is not a request", request_id=rid))

    async def _refuse(self, exc: WireError) -> None:
        """A message that could not be decoded: an error event if it names a request."""
        request_id = exc.request_id
        if request_id is None:
            self.counters["undecodable"] += 1
            logger.warning("dropped undecodable message (%s)", exc.reason[:200])
            return
        self.counters["rejected"] += 1
        logger.warning("rejected %s: %s", request_id, exc.reason[:200])
        await self.publisher.publish(
            RenderError(request_id=request_id, code="invalid_request", message=exc.reason), reply_to=exc.reply_to
        )

    async def _on_render(self, request: RenderRequest) -> None:
        rid = request.request_id
        active = self._active.get(rid)
        if active is not None:
            # Idempotency: a repeat of a request in flight only gets its acceptance again
            # (once it is journaled; until then the client's next re-send will do).
            if active.accepted:
                await self._publish_accepted(active)
            return
        try:
            admission = self.pipeline.admit(request)
            limits = self.config.limits
            if len(self._active) >= limits.max_in_flight + limits.max_queued:
                raise Overloaded(f"service is at capacity ({len(self._active)} requests); try again later")
            per_client = limits.max_in_flight_per_client
            if per_client and self._per_client[request.reply_to or ""] >= per_client:
                raise Overloaded(
                    f"client {request.reply_to or '(no reply_to)'} already has {per_client} requests in flight; "
                    "wait for some to finish"
                )
        except ImageServerError as exc:
            self.counters["rejected"] += 1
            logger.info("! %s refused: %s", rid, exc.message)
            await self.publisher.publish(
                error_event(exc, request, generator=request.generator), reply_to=request.reply_to
            )
            return
        active = _Active(request, admission.generator, time.perf_counter())
        self._track(active)
        active.task = asyncio.create_task(self._admit_and_run(active, admission), name=f"render:{rid}")

    async def _admit_and_run(self, active: _Active, admission: Admission) -> None:
        """Journal the request, publish RenderAccepted, then render (or answer a repeat)."""
        if await self._ended_before_start(active):
            return
        request = active.request
        if self.journal is not None:
            try:
                recorded = await self.journal.admit(request.request_id, active.generator, request.model_dump_json())
            except asyncio.CancelledError:
                if active.end_reason is None:
                    raise
                await asyncio.shield(self._publish_terminal(active, error_event(active.end_reason, request)))
                return
            if recorded.admission is Recorded.FINISHED:
                # A repeat of a finished request: the stored terminal event, same content.
                self._untrack(active)
                self.counters["repeated"] += 1
                stored = MESSAGE_ADAPTER.validate_json(recorded.entry.terminal or "")
                await self.publisher.publish(stored, reply_to=request.reply_to, blobs=recorded.blobs)
                return
        self.counters["accepted"] += 1
        logger.info("→ %s accepted for %s", request.request_id, active.generator)
        if request.clear_queue:
            self._end_queued(Superseded("cleared by a request with clear_queue", request_id=request.request_id))
        if request.channel:
            self._supersede_channel(request)
        active.accepted = True
        await self._publish_accepted(active)
        await self._run(active, admission)

    async def _publish_accepted(self, active: _Active) -> None:
        position = self.manager.scheduler.position(active.request.request_id) or 0
        accepted = RenderAccepted(
            request_id=active.request.request_id, generator=active.generator, queue_position=position
        )
        await self.publisher.publish(accepted, reply_to=active.request.reply_to)

    async def _on_cancel(self, message: CancelRequest) -> None:
        active = self._active.get(message.request_id)
        if active is None:
            logger.info("cancel for %s: not in flight", message.request_id)
            return
        self._end(active, Cancelled("cancelled by request", request_id=message.request_id))

    async def _on_status(self, message: StatusRequest) -> None:
        await self.publisher.publish(self.status(message.request_id), reply_to=message.reply_to)

    def status(self, request_id: str | None = None) -> ServiceStatus:
        scheduler = self.manager.scheduler
        generators = [
            GeneratorStatus(
                name=name,
                strategy=self.manager.config(name).strategy,
                in_flight=scheduler.running(name),
                concurrency=self.manager.config(name).concurrency,
                image_to_image=self.manager.is_image_to_image(name),
                cooling_down_until=self._cooling_down_until(name),
            )
            for name in self.manager.available()
        ]
        return ServiceStatus(
            request_id=request_id,
            default_generator=self.manager.default,
            generators=generators,
            queued=self.queued,
            in_flight=scheduler.in_flight,
            uptime_s=self.uptime_s,
            counters=dict(self.counters),
        )

    def _cooling_down_until(self, name: str) -> float | None:
        """When ``name``'s cool-down ends, as a wall-clock epoch (the tracker keeps monotonic time)."""
        tracker = self.pipeline.cooldowns
        until = tracker.cooling_until(name)
        return None if until is None else time.time() + (until - tracker.clock())

    def _track(self, active: _Active) -> None:
        self._active[active.request.request_id] = active
        self._per_client[active.request.reply_to or ""] += 1

    def _untrack(self, active: _Active) -> None:
        if self._active.pop(active.request.request_id, None) is not None:
            key = active.request.reply_to or ""
            self._per_client[key] -= 1
            if self._per_client[key] <= 0:
                del self._per_client[key]

    # -- ending requests early --------------------------------------------------------

    def _end(self, active: _Active, reason: ImageServerError) -> None:
        """Cancel a request's task; the task itself publishes ``reason`` as its terminal event."""
        if active.end_reason is None and active.task is not None:
            active.end_reason = reason
            # A task cancelled before its first step never runs its handlers and the request
            # would vanish (a CancelRequest right behind its RenderRequest does that); a task
            # that has not started finds end_reason when it does.
            if active.started:
                active.task.cancel()

    async def _ended_before_start(self, active: _Active) -> bool:
        """Mark the task started; if the request was ended before that, publish its end."""
        active.started = True
        if active.end_reason is None:
            return False
        await self._publish_terminal(active, error_event(active.end_reason, active.request, generator=active.generator))
        return True

    def _supersede_channel(self, request: RenderRequest) -> None:
        assert request.channel is not None
        older = self._active.get(self._channels.get(request.channel, ""))
        if older is not None:
            self._end(older, Superseded(f"superseded by {request.request_id} on channel {request.channel}"))
        self._channels[request.channel] = request.request_id

    def _end_queued(self, reason: ImageServerError) -> None:
        """End every request that has not started rendering (waiting for a slot)."""
        for active in list(self._active.values()):
            if active.request.request_id == reason.request_id:
                continue
            if self.manager.scheduler.position(active.request.request_id) is not None:
                self._end(active, reason)

    # -- running ----------------------------------------------------------------------

    async def _run(self, active: _Active, admission: Admission) -> None:
        request = active.request
        blobs: list[bytes] = []
        try:
            # The request joins the scheduler's queue when pipeline.run asks for a slot, that
            # is when this task first yields: report its place then, if it really waits.
            asyncio.get_running_loop().call_soon(self._report_queued, active)
            outcome: RenderOutcome = await self.pipeline.run(
                request,
                admission,
                received_at=active.received_at,
                progress=lambda stage, fraction, message, position: self._progress(
                    active, stage, fraction, message, position
                ),
            )
            event: ImageReady | RenderError = outcome.event
            blobs = outcome.blobs
        except asyncio.CancelledError:
            if active.end_reason is None:
                raise  # shutdown: no terminal event is invented; the request stays unfinished
            event = error_event(active.end_reason, request, generator=active.generator)
        except ImageServerError as exc:
            event = error_event(exc, request, generator=active.generator)
        except Exception as exc:
            logger.exception("! %s failed unexpectedly", request.request_id)
            event = error_event(exc, request, generator=active.generator)
        await asyncio.shield(self._publish_terminal(active, event, blobs))

    def _report_queued(self, active: _Active) -> None:
        position = self.manager.scheduler.position(active.request.request_id)
        if position is not None and active.end_reason is None:
            self._progress(active, "queued", None, None, position)

    def _progress(
        self, active: _Active, stage: str, fraction: float | None, message: str | None, position: int | None
    ) -> None:
        if active.throttle is None:
            active.throttle = ProgressThrottle(lambda event: self._send_progress(active, event))
        active.throttle(
            RenderProgress(
                request_id=active.request.request_id,
                stage=stage,
                generator=active.generator,
                queue_position=position,
                progress=fraction,
                message=message,
            )
        )

    def _send_progress(self, active: _Active, event: RenderProgress) -> None:
        task = asyncio.get_running_loop().create_task(self.publisher.publish(event, reply_to=active.request.reply_to))
        task.add_done_callback(_log_failure)

    async def _publish_terminal(
        self, active: _Active, event: ImageReady | RenderError, blobs: Sequence[bytes] = ()
    ) -> None:
        """Journal the terminal event, then publish it: exactly one per accepted request."""
        request = active.request
        rid = request.request_id
        if active.throttle is not None:
            active.throttle.cancel()  # no progress after the terminal event
        self._untrack(active)
        if request.channel and self._channels.get(request.channel) == rid:
            del self._channels[request.channel]
        if isinstance(event, ImageReady):
            self.counters["completed"] += 1
            logger.info("← %s %s %.2fs", rid, event.generator, event.timings.total / 1000)
        else:
            self.counters["failed"] += 1
            logger.info("! %s %s: %s", rid, event.code, event.message)
        stamped = self.publisher.stamp(event)
        if self.journal is not None:
            total = stamped.timings.total if isinstance(stamped, ImageReady) else None
            code = stamped.code if isinstance(stamped, RenderError) else None
            try:
                await self.journal.finish(rid, stamped.type, code, stamped.model_dump_json(), blobs, total)
            except Exception:
                logger.exception("journaling the terminal event of %s failed; publishing it anyway", rid)
        await self.publisher.send(stamped, reply_to=request.reply_to, blobs=blobs)

    # -- journal ----------------------------------------------------------------------

    async def _resume(self) -> None:
        """Restart every accepted request that has no terminal record (after a crash)."""
        assert self.journal is not None
        for entry in await self.journal.unfinished():
            request = RenderRequest.model_validate_json(entry.request_json)
            active = _Active(request, entry.generator, time.perf_counter(), accepted=True)
            self._track(active)
            try:
                admission = self.pipeline.admit(request)
            except ImageServerError as exc:  # e.g. the generator was removed from the config
                await self._publish_terminal(active, error_event(exc, request, generator=entry.generator))
                continue
            self.counters["resumed"] += 1
            logger.info("↻ %s resumed", request.request_id)
            if request.channel:
                self._supersede_channel(request)
            active.task = asyncio.create_task(self._resume_one(active, admission), name=f"render:{request.request_id}")

    async def _resume_one(self, active: _Active, admission: Admission) -> None:
        if await self._ended_before_start(active):
            return
        await self._publish_accepted(active)
        await self._run(active, admission)

    async def _prune_loop(self, journal: Journal) -> None:
        while True:
            removed = await journal.prune()
            if removed:
                logger.info("pruned %d finished journal entries", removed)
            await asyncio.sleep(self.config.journal.prune_interval_s)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("publishing a progress event failed: %r", task.exception())
