"""Gateway side of events: relay ``IMAGE_EVENTS`` to the ZMQ events socket, images included.

Each gateway has its own durable consumer, so one that restarts catches up on what was
stored while it was down. Images travel as Object Store entries; here they become what the
request asked for (a file under this gateway's output_dir, inline base64, or raw frames).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter, OrderedDict
from collections.abc import Sequence

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import BaseModel

from image_server.cluster import names
from image_server.cluster.connection import Cluster
from image_server.cluster.envelope import Envelope, Relayed
from image_server.errors import StorageFailed
from image_server.publisher import EventPublisher
from image_server.storage import OutputStore, Placement
from schemas import ImageReady, OutputImage, RenderError

logger = logging.getLogger(__name__)

REMEMBERED_TERMINALS = 100_000  # ids whose terminal event this gateway relayed (drops repeats)
RELAY_ACK_WAIT_S = 30.0


async def materialize(envelope: Envelope, cluster: Cluster, store: OutputStore) -> tuple[Relayed, list[bytes]]:
    """The event as the client expects it, with its images fetched and delivered."""
    event = envelope.unwrap()
    if not isinstance(event, ImageReady) or not envelope.blobs:
        return event, []
    images: list[OutputImage] = []
    blobs: list[bytes] = []
    try:
        for index, image in enumerate(event.images):
            if image.frame is None:  # a provider URL passed through
                images.append(image)
                continue
            blob = envelope.blobs[image.frame]
            data = blob.inline_bytes()
            if data is None:
                read = functools.partial(cluster.outputs.get, blob.object or "")
                data = (await cluster.retry("read image", read)).data or b""
            place = Placement(envelope.request_id, envelope.project, event.generator, index, frame=len(blobs))
            stored = await asyncio.to_thread(store.deliver, data, image, place, envelope.delivery)
            images.append(stored.output)
            if stored.blob is not None:
                blobs.append(stored.blob)
    except TimeoutError:
        raise  # an OSError too, but NATS being slow: the relay tries the event again
    except StorageFailed as exc:  # this gateway's output_dir refused the file
        logger.error("images of %s could not be written: %s", envelope.request_id, exc.message)
        return _failed(event, "storage", exc.message), []
    except (NotFoundError, OSError) as exc:
        # Expired (results_ttl_s): say so; other errors (NATS unavailable for longer than
        # the retries) propagate and the event is relayed again.
        logger.error("images of %s could not be delivered: %r", envelope.request_id, exc)
        return _failed(event, "internal", "the rendered image is no longer stored; render it again"), []
    return event.model_copy(update={"images": images, "uri": images[0].uri if images else None}), blobs


async def send_stored(
    publisher: EventPublisher, event: BaseModel, *, reply_to: str | None, blobs: Sequence[bytes] = ()
) -> None:
    """Send an event on the ZMQ socket with this gateway's ``seq``. In distributed mode
    JetStream is the journal: a RenderAccepted goes out after the PubAck, a terminal event
    after it won its create-only slot in IMAGE_RESULTS (and once per id from this relay), a
    refusal stands for nothing stored. So they take the publisher's stamped path here,
    as the single process's Outbox does after its journal."""
    await publisher.send(publisher.stamp(event), reply_to=reply_to, blobs=blobs)


def _failed(event: ImageReady, code: str, message: str) -> RenderError:
    return RenderError(
        request_id=event.request_id,
        code=code,
        message=message,
        retryable=True,
        generator=event.generator,
        metadata=event.metadata,
    )


class Relay:
    def __init__(
        self,
        cluster: Cluster,
        publisher: EventPublisher,
        store: OutputStore,
        counters: Counter[str],
        *,
        service_id: str,
    ) -> None:
        self.cluster = cluster
        self.publisher = publisher
        self.store = store
        self.counters = counters
        self.service_id = service_id
        self._relayed: OrderedDict[str, None] = OrderedDict()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.cluster.js.subscribe(
            names.EVENT_SUBJECTS,
            durable=names.relay_consumer(self.service_id),
            stream=names.EVENTS_STREAM,
            manual_ack=True,
            cb=self._on_message,
            config=ConsumerConfig(
                # A new gateway starts from now; a restarted one resumes where it stopped.
                deliver_policy=DeliverPolicy.NEW,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=RELAY_ACK_WAIT_S,
                num_replicas=self.cluster.config.replicas,
            ),
        )

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()  # the durable consumer stays: a restart resumes from it
            self._sub = None

    async def _on_message(self, msg: Msg) -> None:
        try:
            envelope = Envelope.model_validate_json(msg.data)
        except ValueError:
            self.counters["internal_errors"] += 1
            logger.exception("an undecodable event in %s", names.EVENTS_STREAM)
            await msg.ack()
            return
        if envelope.terminal and envelope.request_id in self._relayed:
            self.counters["duplicates_dropped"] += 1
        else:
            try:
                await self.send(envelope)
            except Exception:
                logger.exception("relaying an event of %s failed; it comes again", envelope.request_id)
                await msg.nak(delay=1.0)
                return
            if envelope.terminal:
                self._remember(envelope.request_id)
        await msg.ack()

    async def send(self, envelope: Envelope) -> None:
        event, blobs = await materialize(envelope, self.cluster, self.store)
        if isinstance(event, ImageReady):
            self.counters["completed"] += 1
        elif isinstance(event, RenderError):
            self.counters["failed"] += 1
        await send_stored(self.publisher, event, reply_to=envelope.reply_to, blobs=blobs)

    def _remember(self, request_id: str) -> None:
        self._relayed[request_id] = None
        if len(self._relayed) > REMEMBERED_TERMINALS:
            self._relayed.popitem(last=False)
