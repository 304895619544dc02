"""Gateway side of requests: admit into JetStream, end requests early, report the cluster.

A request is accepted (``RenderAccepted``) only after JetStream acknowledged storing it,
with ``Nats-Msg-Id`` = its request id, so a repeat inside the duplicate window is not
queued twice. A repeat of a finished request gets its stored terminal event again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError

from image_server.cluster import names
from image_server.cluster.connection import Cluster, open_cluster
from image_server.cluster.envelope import Envelope
from image_server.cluster.relay import Relay, send_stored
from image_server.config import ServiceConfig
from image_server.errors import ImageServerError, InvalidRequest
from image_server.identity import Ticket
from image_server.outcomes import error_event
from image_server.pipeline import RenderPipeline, RenderPlan
from image_server.publisher import EventPublisher
from schemas import ClusterStatus, RenderAccepted, RenderError, RenderRequest, RequestConflict, WorkerStatus

logger = logging.getLogger(__name__)

# Room for the headers a request message carries besides its body.
HEADER_ROOM = 8192


class Gateway:
    """``async with Gateway(...)``: connected, its relay running."""

    def __init__(
        self,
        config: ServiceConfig,
        pipeline: RenderPipeline,
        publisher: EventPublisher,
        counters: Counter[str],
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.publisher = publisher
        self.counters = counters
        self._stack = contextlib.AsyncExitStack()
        self._admitting: dict[str, asyncio.Task[None]] = {}
        self._cluster: Cluster | None = None
        self._relay: Relay | None = None

    @property
    def cluster(self) -> Cluster:
        assert self._cluster is not None, "gateway not started"
        return self._cluster

    async def __aenter__(self) -> Gateway:
        name = f"gateway {self.config.service_id}"
        self._cluster = await self._stack.enter_async_context(open_cluster(self.config.cluster, name=name))
        self._relay = Relay(
            self._cluster,
            self.publisher,
            self.pipeline.store,
            self.counters,
            service_id=self.config.service_id,
        )
        await self._relay.start()
        self._stack.push_async_callback(self._relay.stop)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._admitting:
            await asyncio.wait(self._admitting.values(), timeout=self.config.shutdown_timeout_s)
        await self._stack.aclose()

    # -- admission --------------------------------------------------------------------

    async def on_render(
        self, request: RenderRequest, frames: Sequence[bytes | bytearray], raw: bytes | bytearray | None, owner: str
    ) -> None:
        """Admit (or refuse) a request from ``owner`` (identity.owner_key of its sender)."""
        rid = request.request_id
        if rid in self._admitting:
            return  # a re-send while this one is being queued: its RenderAccepted is coming
        try:
            missing = sorted(index for index in request.frames_used() if index >= len(frames))
            if missing:
                raise InvalidRequest(
                    f"image frame(s) {missing} not in the message: it has {len(frames)} extra frame(s)",
                    request_id=rid,
                )
            plan = self.pipeline.admit(request, client=owner)
        except ImageServerError as exc:
            self.counters["rejected"] += 1
            logger.info("! %s refused: %s", rid, exc.message)
            refusal = error_event(exc, request, generator=request.generator)
            await self.refuse(Ticket(rid, owner, request.reply_to), refusal)
            return
        task = asyncio.create_task(self._admit(request, plan, frames, raw, owner), name=f"admit:{rid}")
        self._admitting[rid] = task
        task.add_done_callback(lambda _: self._admitting.pop(rid, None))

    async def _admit(
        self,
        request: RenderRequest,
        plan: RenderPlan,
        frames: Sequence[bytes | bytearray],
        raw: bytes | bytearray | None,
        owner: str,
    ) -> None:
        rid = request.request_id
        cluster = self.cluster
        try:
            stored = await self._stored(rid)
            if stored is not None and stored.owner != owner:
                await self._conflict(rid, request.reply_to, "another client's request holds this id")
                return
            if stored is not None:
                self.counters["repeated"] += 1
                assert self._relay is not None
                # To this client: the envelope's reply_to is the first sender's.
                envelope = stored.model_copy(update={"reply_to": request.reply_to})
                await self._relay.send(envelope)
                return
            headers = {names.MSG_ID: rid, names.ACCEPTED_AT: repr(time.time()), names.OWNER: owner}
            for index, frame in enumerate(frames):
                put = functools.partial(cluster.outputs.put, names.frame_object(rid, index), bytes(frame))
                await cluster.retry("store request frame", put)
            body = bytes(raw) if raw else request.model_dump_json().encode()
            if len(body) > cluster.nc.max_payload - HEADER_ROOM:
                await cluster.retry(
                    "store request", functools.partial(cluster.outputs.put, names.body_object(rid), body)
                )
                headers[names.BODY_OBJECT] = names.body_object(rid)
                body = b""
            subject = names.request_subject(names.band_of(request.priority))
            queued = functools.partial(cluster.js.publish, subject, body, headers=headers)
            ack = await cluster.retry("queue request", queued)
        except Exception:
            logger.exception("! %s could not be queued", rid)
            failure = RenderError(
                request_id=rid,
                code="internal",
                message="the service could not queue the request; try again",
                retryable=True,
                metadata=request.metadata,
            )
            await send_stored(self.publisher, failure, reply_to=request.reply_to)
            return
        if not ack.duplicate:
            self.counters["accepted"] += 1
            logger.info("→ %s queued for %s", rid, plan.generator)
            if request.clear_queue:
                await self._clear_before(ack.seq, rid, owner)
            if request.channel:
                await self._supersede_channel(request, owner)
        await cluster.nc.publish(names.WORK_NOTICE, names.band_of(request.priority).encode())
        accepted = RenderAccepted(request_id=rid, generator=plan.generator, queue_position=0)
        await send_stored(self.publisher, accepted, reply_to=request.reply_to)

    async def _stored(self, rid: str) -> Envelope | None:
        try:
            entry = await self.cluster.retry("read result", lambda: self.cluster.results.get(names.token(rid)))
        except KeyNotFoundError:
            return None
        return Envelope.model_validate_json(entry.value or b"")

    # -- ending requests early ----------------------------------------------------------

    async def cancel(self, request_id: str, owner: str) -> bool:
        """End ``owner``'s ``request_id`` with ``cancelled`` wherever it is; False when it has
        finished. A cancel from another client reaches nothing: the entry is keyed by owner."""
        if await self._stored(request_id) is not None:
            return False
        await self._end(request_id, owner, "cancelled", "cancelled by request")
        return True

    async def _end(self, request_id: str, owner: str, code: str, message: str) -> None:
        """A KV entry (a worker checks it before starting the request) and a notice (a worker
        running it now stops)."""
        notice = json.dumps({"request_id": request_id, "owner": owner, "code": code, "message": message}).encode()
        await self.cluster.control.put(names.control_key(owner, request_id), notice)
        await self.cluster.nc.publish(names.CONTROL_NOTICE, notice)

    async def _supersede_channel(self, request: RenderRequest, owner: str) -> None:
        assert request.channel is not None
        key = names.channel_key(owner, request.channel)
        try:
            older = (await self.cluster.channels.get(key)).value or b""
        except KeyNotFoundError:
            older = b""
        await self.cluster.channels.put(key, request.request_id.encode())
        if older and older.decode() != request.request_id:
            message = f"superseded by {request.request_id} on channel {request.channel}"
            await self._end(older.decode(), owner, "superseded", message)

    async def _clear_before(self, seq: int, by: str, owner: str) -> None:
        """Ends ``owner``'s requests queued before the stream sequence ``seq``."""
        mark = json.dumps({"clear_seq": seq, "by": by, "owner": owner}).encode()
        await self.cluster.control.put(names.clear_key(owner), mark)
        await self.cluster.nc.publish(names.CONTROL_NOTICE, mark)

    async def refuse(self, ticket: Ticket, event: RenderError) -> None:
        """A message that was not admitted: its RenderError is the id's one terminal event, so
        it is stored create-only like any other; the same id again gets a RequestConflict."""
        rid = ticket.request_id
        envelope = Envelope(event=event.model_dump_json(), request_id=rid, owner=ticket.owner, reply_to=ticket.reply_to)
        try:
            create = functools.partial(
                self.cluster.results.create, names.token(rid), envelope.model_dump_json().encode()
            )
            await self.cluster.retry("store refusal", create)
        except KeyWrongLastSequenceError:
            await self._conflict(
                rid, ticket.reply_to, "this id already has its terminal event; the message was ignored"
            )
            return
        except Exception:
            logger.exception("storing the refusal of %s failed; sending it anyway", rid)
        await send_stored(self.publisher, event, reply_to=ticket.reply_to)

    async def _conflict(self, request_id: str, reply_to: str | None, reason: str) -> None:
        self.counters["conflicts"] += 1
        logger.warning("conflict on %s: %s", request_id, reason)
        await self.publisher.publish(RequestConflict(request_id=request_id, message=reason), reply_to=reply_to)

    # -- status -------------------------------------------------------------------------

    async def status(self) -> ClusterStatus:
        return await cluster_status(self.cluster)


async def cluster_status(cluster: Cluster) -> ClusterStatus:
    workers: list[WorkerStatus] = []
    try:
        keys = await cluster.workers.keys()
    except NoKeysError:
        keys = []
    for key in keys:
        with contextlib.suppress(KeyNotFoundError):
            entry = await cluster.workers.get(key)
            workers.append(WorkerStatus.model_validate_json(entry.value or b"{}"))
    queued: dict[str, int] = {}
    running: dict[str, int] = {}
    redelivered = 0
    for band in names.BANDS:
        info = await cluster.js.consumer_info(names.REQUESTS_STREAM, names.consumer_name(band))
        queued[band] = info.num_pending or 0
        running[band] = info.num_ack_pending or 0
        redelivered += info.num_redelivered or 0
    workers.sort(key=lambda worker: worker.worker_id)
    return ClusterStatus(workers=workers, queued=queued, running=running, redelivered=redelivered)
