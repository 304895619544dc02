"""Outbound events: stamp ``service_id`` and a monotonic ``seq``, pick the topic, send."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TypeVar

import zmq.asyncio
from pydantic import BaseModel

from schemas import event_topic

E = TypeVar("E", bound=BaseModel)


class EventPublisher:
    def __init__(self, socket: zmq.asyncio.Socket, *, service_id: str) -> None:
        self.socket = socket
        self.service_id = service_id
        self._seq = itertools.count(1)
        self.published = 0

    def stamp(self, event: E) -> E:
        """The event with this service's id and the next ``seq``."""
        return event.model_copy(update={"service_id": self.service_id, "seq": next(self._seq)})

    async def publish(self, event: BaseModel, *, reply_to: str | None = None, blobs: Sequence[bytes] = ()) -> BaseModel:
        """Send ``[topic, json, *blobs]``; returns the stamped event. Large blobs go zero-copy."""
        stamped = self.stamp(event)
        await self.send(stamped, reply_to=reply_to, blobs=blobs)
        return stamped

    async def send(self, event: BaseModel, *, reply_to: str | None = None, blobs: Sequence[bytes] = ()) -> None:
        """Send an already stamped event (a stored terminal event is re-sent unchanged)."""
        topic = event_topic(type(event).model_fields["type"].default, reply_to).encode("ascii")
        frames = [topic, event.model_dump_json().encode(), *blobs]
        # copy=False pays off for large frames (1.5-2.3x measured); small ones are copied anyway.
        await self.socket.send_multipart(frames, copy=not blobs)
        self.published += 1
