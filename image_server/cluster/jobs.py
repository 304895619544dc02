"""One delivered request on a worker, from the stream message to its stored terminal event.

Order matters for the guarantee: the images go into the Object Store, then the terminal
event into ``IMAGE_RESULTS`` (create-only: if another worker stored one first, that one
wins and ours is dropped), then the stored event is published to ``IMAGE_EVENTS`` (with a
message id, so a repeat after a crash is dropped), and only then is the request acked.
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
from dataclasses import dataclass, field

from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from image_server.cluster import names
from image_server.cluster.connection import Cluster
from image_server.cluster.envelope import Blob, Envelope, Relayed
from image_server.errors import Cancelled, ImageServerError, Superseded
from image_server.outcomes import error_event
from image_server.pipeline import RenderOutcome, RenderPipeline
from image_server.progress import ProgressThrottle
from schemas import ImageReady, RenderProgress, RenderRequest

logger = logging.getLogger(__name__)

# Images up to this much in total ride inside the terminal event (stored in IMAGE_RESULTS and
# sent on IMAGE_EVENTS, both well under NATS's 1 MiB default message size); bigger ones go
# to the Object Store.
INLINE_BYTES = 256 * 1024

ENDINGS: dict[str, type[ImageServerError]] = {"cancelled": Cancelled, "superseded": Superseded}


@dataclass
class Running:
    """A request this worker holds, until its terminal event is stored."""

    request: RenderRequest
    owner: str  # the sender it is scoped to
    seq: int  # its stream sequence (clear_queue ends the ones older than the clearing request)
    render: asyncio.Task[RenderOutcome] | None = None
    started: bool = False  # has a generator slot: clear_queue no longer ends it
    end_reason: ImageServerError | None = None

    def end(self, reason: ImageServerError) -> None:
        if self.end_reason is None:
            self.end_reason = reason
            if self.render is not None:
                self.render.cancel()


@dataclass
class ClearMark:
    seq: int = 0
    by: str = ""


@dataclass
class Jobs:
    cluster: Cluster
    pipeline: RenderPipeline
    default_project: str
    counters: Counter[str]
    running: dict[str, Running] = field(default_factory=dict)
    clears: dict[str, ClearMark] = field(default_factory=dict)  # owner -> its latest clear_queue

    # -- control ---------------------------------------------------------------------

    def on_control(self, notice: dict[str, object]) -> None:
        """A cancel, supersede or clear_queue notice from a gateway (core NATS)."""
        owner = str(notice.get("owner", ""))
        if "clear_seq" in notice:
            self.note_clear(owner, int(str(notice["clear_seq"])), str(notice.get("by", "")))
            return
        running = self.running.get(str(notice.get("request_id", "")))
        ending = ENDINGS.get(str(notice.get("code")))
        if running is not None and ending is not None and running.owner == owner:
            running.end(ending(str(notice.get("message", "")), request_id=running.request.request_id))

    def note_clear(self, owner: str, seq: int, by: str) -> None:
        if seq <= self.clears.get(owner, ClearMark()).seq:
            return
        self.clears[owner] = ClearMark(seq, by)
        for running in list(self.running.values()):
            rid = running.request.request_id
            if running.owner == owner and running.seq < seq and not running.started and rid != by:
                running.end(Superseded("cleared by a request with clear_queue", request_id=rid))

    # -- one delivery ----------------------------------------------------------------

    async def handle(self, msg: Msg) -> None:
        headers = msg.headers or {}
        rid = headers.get(names.MSG_ID, "")
        metadata = msg.metadata
        try:
            # On a first delivery a stored result is all but impossible (the gateway checked
            # before queueing); if one races in, storing ours fails and the stored one is sent.
            stored = await self._stored_result(rid) if metadata.num_delivered > 1 else None
            if stored is not None:
                # Finished before (its worker died before acking): make sure it was published.
                self.counters["already_finished"] += 1
                await self._publish(rid, stored)
                await msg.ack()
                return
            request, frames = await self._load(msg, headers)
            owner = headers.get(names.OWNER, "")
            ending = await self._reason_to_end(request, owner, metadata.sequence.stream, metadata.num_delivered)
            if ending is not None:
                event = error_event(ending, request, generator=request.generator)
                await self._finish(msg, request, owner, event)
                return
            await self._render(msg, request, owner, frames, metadata.sequence.stream, headers)
        except asyncio.CancelledError:
            # Shutdown: hand it back now rather than after the ack wait.
            with contextlib.suppress(Exception):
                await asyncio.shield(msg.nak())
            raise

    async def _stored_result(self, rid: str) -> bytes | None:
        try:
            entry = await self.cluster.retry("read result", lambda: self.cluster.results.get(names.token(rid)))
        except KeyNotFoundError:
            return None
        return entry.value

    async def _load(self, msg: Msg, headers: dict[str, str]) -> tuple[RenderRequest, list[bytes]]:
        body = msg.data
        if names.BODY_OBJECT in headers:
            body = await self._object(headers[names.BODY_OBJECT])
        request = RenderRequest.model_validate_json(body)
        frames: list[bytes] = []
        for index in range(max(request.frames_used(), default=-1) + 1):
            frames.append(await self._object(names.frame_object(request.request_id, index)))
        return request, frames

    async def _object(self, name: str) -> bytes:
        result = await self.cluster.retry("read object", lambda: self.cluster.outputs.get(name))
        return result.data or b""

    async def _reason_to_end(
        self, request: RenderRequest, owner: str, seq: int, delivered: int
    ) -> ImageServerError | None:
        rid = request.request_id
        limit = self.cluster.config.max_deliver
        if delivered > limit:
            self.counters["gave_up"] += 1
            return ImageServerError(
                f"request was delivered {limit} times without finishing (each worker that took it stopped "
                "or lost its connection); giving up",
                request_id=rid,
            )
        control, clear = await asyncio.gather(
            self._control(names.control_key(owner, rid)), self._control(names.clear_key(owner))
        )
        ending = ENDINGS.get(str(control.get("code")))
        if ending is not None:
            return ending(str(control.get("message", "")), request_id=rid)
        if clear:
            self.note_clear(owner, int(str(clear.get("clear_seq", 0))), str(clear.get("by", "")))
        mark = self.clears.get(owner, ClearMark())
        if seq < mark.seq and rid != mark.by:
            return Superseded("cleared by a request with clear_queue", request_id=rid)
        return None

    async def _control(self, key: str) -> dict[str, object]:
        try:
            entry = await self.cluster.retry("read control", lambda: self.cluster.control.get(key))
        except KeyNotFoundError:
            return {}
        notice = json.loads(entry.value or b"{}")
        return notice if isinstance(notice, dict) else {}

    async def _render(
        self,
        msg: Msg,
        request: RenderRequest,
        owner: str,
        frames: Sequence[bytes],
        seq: int,
        headers: dict[str, str],
    ) -> None:
        rid = request.request_id
        running = Running(request, owner, seq)
        self.running[rid] = running
        throttle = ProgressThrottle(lambda event: self._send_progress(request, event))
        keepalive = asyncio.create_task(self._in_progress(msg), name=f"in-progress:{rid}")
        blobs: list[bytes] = []
        try:
            plan = self.pipeline.admit(request, client=owner)

            def progress(stage: str, fraction: float | None, message: str | None, position: int | None) -> None:
                running.started = running.started or stage == "started"
                throttle(
                    RenderProgress(
                        request_id=rid,
                        stage=stage,
                        generator=plan.generator,
                        progress=fraction,
                        message=message,
                        queue_position=position,
                    )
                )

            running.render = asyncio.create_task(
                self.pipeline.run(
                    request,
                    plan,
                    received_at=_received_at(headers),
                    frames=frames,
                    progress=progress,
                )
            )
            outcome = await running.render
            event: Relayed = outcome.event
            blobs = outcome.blobs
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if running.end_reason is None or (current is not None and current.cancelling()):
                raise
            event = error_event(running.end_reason, request, generator=request.generator)
        except ImageServerError as exc:
            event = error_event(exc, request, generator=request.generator)
        except Exception as exc:
            logger.exception("! %s failed unexpectedly", rid)
            event = error_event(exc, request, generator=request.generator)
        finally:
            throttle.cancel()
            keepalive.cancel()
            self.running.pop(rid, None)
        await asyncio.shield(self._finish(msg, request, owner, event, blobs))

    async def _in_progress(self, msg: Msg) -> None:
        """Tell JetStream we are still at it, well inside the ack wait."""
        while True:
            await asyncio.sleep(self.cluster.config.ack_wait_s / 3)
            await msg.in_progress()

    def _send_progress(self, request: RenderRequest, event: RenderProgress) -> None:
        envelope = Envelope.wrap(event, request, owner="", project=request.project or self.default_project)
        subject = names.event_subject(request.reply_to)
        # Core publish (no wait for the stream's ack): progress is advisory.
        task = asyncio.ensure_future(self.cluster.nc.publish(subject, envelope.model_dump_json().encode()))
        task.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def _finish(
        self, msg: Msg, request: RenderRequest, owner: str, event: Relayed, blobs: Sequence[bytes] = ()
    ) -> None:
        rid = request.request_id
        stored: list[Blob] = []
        inline_room = INLINE_BYTES
        for index, blob in enumerate(blobs):
            if len(blob) <= inline_room:
                inline_room -= len(blob)
                stored.append(Blob.inline(blob))
                continue
            name = names.output_object(rid, index)
            await self.cluster.retry("store image", functools.partial(self.cluster.outputs.put, name, blob))
            stored.append(Blob(object=name))
        project = request.project or self.default_project
        envelope = Envelope.wrap(event, request, owner=owner, project=project, blobs=stored)
        data = envelope.model_dump_json().encode()
        try:
            await self.cluster.retry("store result", lambda: self.cluster.results.create(names.token(rid), data))
            self.counters["completed" if isinstance(event, ImageReady) else "failed"] += 1
        except KeyWrongLastSequenceError:
            # Another worker stored its terminal event first: that one is the answer.
            self.counters["lost_race"] += 1
            data = await self._stored_result(rid) or data
        await self._publish(rid, data)
        await self.cluster.retry("ack", msg.ack_sync)
        logger.info("← %s %s", rid, event.type)

    async def _publish(self, rid: str, data: bytes) -> None:
        subject = names.event_subject(Envelope.model_validate_json(data).reply_to)
        headers = {names.MSG_ID: f"{rid}:end"}
        await self.cluster.retry("publish event", lambda: self.cluster.js.publish(subject, data, headers=headers))


def _received_at(headers: dict[str, str]) -> float:
    """The gateway's acceptance time on this process's perf_counter clock (for ``timings``)."""
    now = time.perf_counter()
    try:
        waited = time.time() - float(headers[names.ACCEPTED_AT])
    except (KeyError, ValueError):
        return now
    return now - max(0.0, waited)
