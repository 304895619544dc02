"""RenderClient: send RenderRequests over ZMQ and await their terminal events.

PUB/SUB drops what is sent before a subscription arrives, so the client waits for the
service's first ``Heartbeat`` before sending, re-sends a request with the same
``request_id`` until it sees ``RenderAccepted`` (the service treats repeats as no-ops),
keeps nudging until the terminal event arrives, and ignores duplicate terminal events.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from urllib.request import url2pathname

import zmq
import zmq.asyncio

from image_server.security import KeyPair, make_client
from image_server.sequence import SeqTracker
from schemas import (
    BatchDone,
    CancelRequest,
    Heartbeat,
    ImageReady,
    RenderAccepted,
    RenderError,
    RenderRequest,
    RequestConflict,
    ServiceStatus,
    StatusRequest,
    WireError,
    decode_frames,
    encode_message,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
RESEND_BYTES_PER_S = 20e6  # added to the first re-send interval: 2 s more for a 40 MB request
_REPLY_TYPES = (
    "RenderAccepted",
    "RenderProgress",
    "ImageReady",
    "RenderError",
    "BatchDone",
    "RequestConflict",
    "ServiceStatus",
)


class RenderFailed(Exception):
    """The service answered with a ``RenderError``; ``event`` holds it."""

    def __init__(self, event: RenderError) -> None:
        super().__init__(f"{event.request_id}: {event.code}: {event.message}")
        self.event = event

    @property
    def code(self) -> str:
        return self.event.code


class MessageTooLarge(ValueError):
    """The request is over the service's message limit; the socket would drop it silently."""


@dataclass
class RenderResult:
    """An ``ImageReady`` and, for delivery ``frames``, the raw image bytes it refers to."""

    event: ImageReady
    frames: list[bytes] = field(default_factory=list)

    def image_bytes(self, index: int = 0, *, fetch_url: bool = False) -> bytes:
        """The encoded bytes of image ``index`` whatever the delivery: the extra frame
        (``frames``), the base64 ``data`` (``inline``), the file (``file``, or a ``file://``
        uri). A provider's http(s) URL (delivery ``url``) is downloaded only with
        ``fetch_url=True`` (a blocking GET); without it a ``ValueError`` says so."""
        image = self.event.images[index]
        if image.frame is not None:
            return self.frames[image.frame]
        if image.data is not None:
            return base64.b64decode(image.data)
        if image.path is not None:
            return Path(image.path).read_bytes()
        uri = image.uri or ""
        if uri.startswith("file://"):
            return Path(url2pathname(urlsplit(uri).path)).read_bytes()
        if uri.startswith(("http://", "https://")):
            if not fetch_url:
                raise ValueError(f"image {index} is at {uri}; call image_bytes(fetch_url=True) to download it")
            import httpx  # only here: most clients never download

            response = httpx.get(uri, timeout=60, follow_redirects=True)
            response.raise_for_status()
            return response.content
        raise ValueError(f"image {index} carries no bytes, path or URI")


@dataclass
class BatchResult:
    """A batch's ``BatchDone`` and its members' own answers by index (a member whose event
    was lost on the way is missing here; ``done.members`` still says how it ended)."""

    done: BatchDone
    members: dict[int, RenderResult | RenderError] = field(default_factory=dict)


@dataclass
class _Pending:
    accepted_by: str | None = None  # service_id of the RenderAccepted
    last_heard: float = 0.0  # monotonic time of the last event about this request
    members: dict[int, RenderResult | RenderError] | None = None  # a batch's, as they arrive
    done: asyncio.Future[RenderResult | RenderError | BatchDone] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class RenderClient:
    """``async with RenderClient(requests_endpoint, events_endpoint) as client:``"""

    def __init__(
        self,
        requests_endpoint: str,
        events_endpoint: str,
        *,
        client_id: str | None = None,
        context: zmq.asyncio.Context | None = None,
        requests_kind: Literal["pub", "push"] = "pub",
        resend_interval_s: float = 0.2,
        max_resend_interval_s: float = 2.0,
        nudge_interval_s: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        on_event: Callable[[Any], None] | None = None,
        curve_keys: KeyPair | None = None,
        curve_server_key: bytes | None = None,
        monitor: bool = False,
        progress: bool | None = None,
    ) -> None:
        self.requests_endpoint = requests_endpoint
        self.events_endpoint = events_endpoint
        self.client_id = client_id or f"client-{uuid.uuid4().hex[:12]}"
        self._own_context = context is None
        self.context = context or zmq.asyncio.Context()
        self.requests_kind = requests_kind
        self.resend_interval_s = resend_interval_s
        self.max_resend_interval_s = max_resend_interval_s
        self.nudge_interval_s = nudge_interval_s
        self.resends = 0
        # service_id -> (seen at, interval, uptime, seq) of its latest Heartbeat
        self._heartbeats: dict[str, tuple[float, float, float, int]] = {}
        self.max_message_bytes = max_message_bytes
        self._on_event = on_event
        # A monitor subscribes to every event, so gaps in ``seq`` mean lost events.
        self.monitor = monitor
        # Progress events cost the service and this client a message each; without a
        # subscription the service does not even build them. By default they are wanted
        # once on_event is set, the only place they go.
        self.progress = progress
        self._progress_subscribed = False
        self.sequence = SeqTracker()
        if (curve_keys is None) != (curve_server_key is None):
            raise ValueError("CURVE needs both the client's key pair and the server's public key")
        self._curve = (curve_keys, curve_server_key) if curve_keys is not None and curve_server_key else None
        self.duplicates = 0
        self.conflicts = 0  # RequestConflict notices: a message of ours named an id held by another request
        self.callback_errors = 0  # exceptions raised by on_event (logged; reading goes on)
        self._pending: dict[str, _Pending] = {}
        self._statuses: dict[str, asyncio.Future[ServiceStatus]] = {}
        self._ready = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._sender: zmq.asyncio.Socket | None = None
        self._events: zmq.asyncio.Socket | None = None

    async def __aenter__(self) -> RenderClient:
        self._events = self.context.socket(zmq.SUB)
        self._events.setsockopt(zmq.LINGER, 0)
        self._secure(self._events)
        if self.monitor:
            self._events.setsockopt(zmq.SUBSCRIBE, b"")
        else:
            self._events.setsockopt(zmq.SUBSCRIBE, b"Heartbeat")
            for message_type in _REPLY_TYPES:
                if message_type == "RenderProgress":
                    continue  # see _follow_progress
                self._events.setsockopt(zmq.SUBSCRIBE, f"{message_type}/{self.client_id}".encode())
        self._follow_progress()
        self._events.connect(self.events_endpoint)
        self._sender = self.context.socket(zmq.PUB if self.requests_kind == "pub" else zmq.PUSH)
        self._sender.setsockopt(zmq.LINGER, 0)
        self._secure(self._sender)
        self._sender.connect(self.requests_endpoint)
        self._reader = asyncio.create_task(self._read_events(), name=f"{self.client_id}-events")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def on_event(self) -> Callable[[Any], None] | None:
        """Called with every event about this client's requests (progress included)."""
        return self._on_event

    @on_event.setter
    def on_event(self, callback: Callable[[Any], None] | None) -> None:
        self._on_event = callback
        self._follow_progress()

    def _follow_progress(self) -> None:
        wanted = self.progress if self.progress is not None else self._on_event is not None
        if wanted and not self._progress_subscribed and self._events is not None and not self.monitor:
            self._events.setsockopt(zmq.SUBSCRIBE, f"RenderProgress/{self.client_id}".encode())
            self._progress_subscribed = True

    def _secure(self, socket: zmq.asyncio.Socket) -> None:
        if self._curve is not None:
            keys, server_key = self._curve
            assert keys is not None and server_key is not None
            make_client(socket, keys, server_key)

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        for socket in (self._sender, self._events):
            if socket is not None:
                socket.close(linger=0)
        self._sender = self._events = None
        self._progress_subscribed = False
        if self._own_context:
            self.context.term()

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait for the first Heartbeat: then our subscription has reached the service."""
        try:
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        except TimeoutError:
            raise TimeoutError(f"no Heartbeat from {self.events_endpoint} within {timeout:g} s") from None

    # -- requests ---------------------------------------------------------------------

    async def render(
        self,
        request: RenderRequest | None = None,
        *,
        timeout: float = 120.0,
        images: Sequence[bytes] = (),
        **fields: Any,
    ) -> RenderResult:
        """Send a request (or build one from ``fields``) and return its ``RenderResult``.

        ``images`` travel raw as the message's extra frames; refer to them from the request
        with ``ImageSource(frame=i)``. Raises ``RenderFailed`` on a ``RenderError`` and
        ``TimeoutError`` when no terminal event arrives within ``timeout`` seconds.
        """
        if fields.get("prompts") or (request is not None and request.prompts):
            raise TypeError("a request with 'prompts' is a batch: send it with render_batch()")
        outcome = await self._submit(request, timeout, images, fields, batch=False)
        if isinstance(outcome, RenderError):
            raise RenderFailed(outcome)
        assert isinstance(outcome, RenderResult)
        return outcome

    async def render_batch(
        self,
        prompts: Sequence[str],
        *,
        timeout: float = 300.0,
        images: Sequence[bytes] = (),
        **fields: Any,
    ) -> BatchResult:
        """Send one request with several ``prompts`` (a batch); return once its ``BatchDone``
        arrives, with each member's own answer. Raises ``RenderFailed`` when the batch
        itself is refused, and ``TimeoutError`` as ``render`` does."""
        fields["prompts"] = list(prompts)
        pending_members: dict[int, RenderResult | RenderError] = {}
        outcome = await self._submit(None, timeout, images, fields, batch=True, members=pending_members)
        if isinstance(outcome, RenderError):
            raise RenderFailed(outcome)
        assert isinstance(outcome, BatchDone)
        return BatchResult(outcome, pending_members)

    async def _submit(
        self,
        request: RenderRequest | None,
        timeout: float,
        images: Sequence[bytes],
        fields: dict[str, Any],
        *,
        batch: bool,
        members: dict[int, RenderResult | RenderError] | None = None,
    ) -> RenderResult | RenderError | BatchDone:
        if request is None:
            fields.setdefault("request_id", uuid.uuid4().hex)
            request = RenderRequest(**fields)
        request = request.model_copy(update={"reply_to": self.client_id})
        frames = encode_message(request, blobs=images)
        size = sum(len(f) for f in frames)
        if size > self.max_message_bytes:
            raise MessageTooLarge(
                f"request {request.request_id} is {size} bytes; the limit is {self.max_message_bytes} "
                "(send reference images as URIs instead of inline data)"
            )
        pending = self._pending.setdefault(request.request_id, _Pending())
        if batch:
            pending.members = members if members is not None else {}
        try:
            async with asyncio.timeout(timeout):
                await self.wait_ready(timeout)
                outcome = await self._send_until_done(frames, pending, size)
        except TimeoutError:
            raise TimeoutError(f"no answer to {request.request_id} within {timeout:g} s") from None
        finally:
            self._pending.pop(request.request_id, None)
        return outcome

    async def _send_until_done(
        self, frames: list[bytes], pending: _Pending, size: int
    ) -> RenderResult | RenderError | BatchDone:
        """Send, then re-send with the same request_id while it may have been lost.

        Until ``RenderAccepted``: every ``resend_interval_s``, growing to the maximum (the
        subscription may not have reached the service yet). After it: only when the
        accepting service's Heartbeats stop or show that it restarted, as until the first
        acceptance (its journal or another worker takes over; events it published before we
        re-subscribed are lost, so a restarted service must confirm again), or when nothing
        was heard for ``nudge_interval_s`` (a lost terminal event is re-published from the
        journal).
        """
        loop = asyncio.get_running_loop()
        # A big request takes the service a while to receive, decode and journal: re-sending
        # it sooner only makes the service receive it twice.
        first_interval = self.resend_interval_s + size / RESEND_BYTES_PER_S
        interval = first_interval
        await self._send(frames)
        last_sent = loop.time()
        while True:
            tick = interval if pending.accepted_by is None else min(0.5, self.nudge_interval_s)
            done, _ = await asyncio.wait([pending.done], timeout=tick)
            if done:
                return pending.done.result()
            now = loop.time()
            if pending.accepted_by is not None and self._is_stale(pending.accepted_by, now):
                pending.accepted_by = None
                interval = first_interval
            if pending.accepted_by is None:
                if now - last_sent < interval:
                    continue
                interval = min(interval * 1.5, self.max_resend_interval_s)
            elif now - max(pending.last_heard, last_sent) < self.nudge_interval_s:
                continue
            self.resends += 1
            await self._send(frames)
            last_sent = now

    def _is_stale(self, service_id: str, now: float) -> bool:
        seen = self._heartbeats.get(service_id)
        if seen is None:
            return True
        seen_at, interval, _, _ = seen
        return now - seen_at > 3 * interval + 0.5

    async def _send(self, frames: list[bytes]) -> None:
        assert self._sender is not None, "use 'async with RenderClient(...)'"
        await self._sender.send_multipart(frames)

    async def cancel(self, request_id: str) -> None:
        """Ask the service to cancel; the pending ``render`` then raises ``RenderFailed``."""
        await self.wait_ready()
        await self._send(encode_message(CancelRequest(request_id=request_id, reply_to=self.client_id)))

    async def status(self, *, timeout: float = 10.0) -> ServiceStatus:
        request_id = f"status-{uuid.uuid4().hex[:12]}"
        future: asyncio.Future[ServiceStatus] = asyncio.get_running_loop().create_future()
        self._statuses[request_id] = future
        message = encode_message(StatusRequest(request_id=request_id, reply_to=self.client_id))
        try:
            async with asyncio.timeout(timeout):
                await self.wait_ready(timeout)
                while not future.done():
                    await self._send(message)
                    await asyncio.wait([future], timeout=self.resend_interval_s)
                return future.result()
        finally:
            self._statuses.pop(request_id, None)

    # -- events -----------------------------------------------------------------------

    async def _read_events(self) -> None:
        assert self._events is not None
        while True:
            frames = await self._events.recv_multipart()
            try:
                decoded = decode_frames(frames)
            except WireError as exc:
                logger.warning("undecodable event: %s", exc.reason)
                continue
            self._dispatch(decoded.message, [bytes(blob) for blob in decoded.blobs])

    def _dispatch(self, event: Any, blobs: list[bytes]) -> None:
        if self.monitor:
            self.sequence.observe(event.service_id, event.seq)
        if isinstance(event, Heartbeat):
            previous = self._heartbeats.get(event.service_id)
            self._heartbeats[event.service_id] = (
                asyncio.get_running_loop().time(),
                event.interval_s,
                event.uptime_s,
                event.seq,
            )
            if previous is not None and (event.uptime_s < previous[2] or event.seq < previous[3]):
                # A new process under the same service_id (uptime and seq start again): its
                # acceptances are void until it confirms them (see _send_until_done).
                for waiting in self._pending.values():
                    if waiting.accepted_by == event.service_id:
                        waiting.accepted_by = None
            self._ready.set()
            return
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                # The user's callback must not kill the reader: every later render would time out.
                self.callback_errors += 1
                logger.exception("on_event raised on %s; events keep being read", type(event).__name__)
        if isinstance(event, RequestConflict):
            # Not an end: the request holding the id still ends once (and anyone may write our
            # reply_to, so a conflict must never fail a pending render).
            self.conflicts += 1
            logger.warning("request %s: %s", event.request_id, event.message)
            return
        if isinstance(event, ServiceStatus):
            future = self._statuses.get(event.request_id or "")
            if future is not None and not future.done():
                future.set_result(event)
            return
        batch = self._pending.get(getattr(event, "batch_id", None) or "")
        if batch is not None and batch.members is not None and isinstance(event, ImageReady | RenderError):
            batch.last_heard = asyncio.get_running_loop().time()
            batch.members[event.batch_index or 0] = (
                RenderResult(event, blobs) if isinstance(event, ImageReady) else event
            )
            return
        pending = self._pending.get(getattr(event, "request_id", ""))
        if pending is None:
            if isinstance(event, ImageReady | RenderError):
                self.duplicates += 1
            return
        pending.last_heard = asyncio.get_running_loop().time()
        if isinstance(event, RenderAccepted):
            pending.accepted_by = event.service_id
        elif isinstance(event, ImageReady | RenderError | BatchDone):
            if pending.done.done():
                self.duplicates += 1
            else:
                pending.done.set_result(RenderResult(event, blobs) if isinstance(event, ImageReady) else event)
