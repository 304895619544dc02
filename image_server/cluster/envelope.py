"""What workers store and send through JetStream: an event plus how the gateway delivers it."""

from __future__ import annotations

import base64

from pydantic import BaseModel, ConfigDict, Field

from schemas import MESSAGE_ADAPTER, DeliveryMode, ImageReady, RenderError, RenderProgress, RenderRequest

Relayed = ImageReady | RenderError | RenderProgress


class Blob(BaseModel):
    """One image's bytes: named in the Object Store, or (small ones) carried inline, which
    spares the gateway an Object Store read (about 1 ms) per image."""

    model_config = ConfigDict(frozen=True)

    object: str | None = None
    data: str | None = None  # base64

    @classmethod
    def inline(cls, data: bytes) -> Blob:
        return cls(data=base64.b64encode(data).decode("ascii"))

    def inline_bytes(self) -> bytes | None:
        return None if self.data is None else base64.b64decode(self.data)


class Envelope(BaseModel):
    """An event for one request. In an ``ImageReady`` each image that has bytes refers to
    them by ``frame`` index into ``blobs``, and the gateway turns them into the ``delivery``
    the request asked for."""

    model_config = ConfigDict(frozen=True)

    event: str  # the event's JSON
    request_id: str
    owner: str = ""  # the sender the request is scoped to (identity.owner_key)
    reply_to: str | None = None
    delivery: DeliveryMode = "file"
    project: str = "default"
    blobs: list[Blob] = Field(default_factory=list)
    terminal: bool = True  # ImageReady or RenderError (else progress)

    @classmethod
    def wrap(
        cls, event: Relayed, request: RenderRequest, *, owner: str, project: str, blobs: list[Blob] | None = None
    ) -> Envelope:
        return cls(
            event=event.model_dump_json(),
            request_id=request.request_id,
            owner=owner,
            reply_to=request.reply_to,
            delivery=request.delivery,
            project=project,
            blobs=blobs or [],
            terminal=not isinstance(event, RenderProgress),
        )

    def unwrap(self) -> Relayed:
        event = MESSAGE_ADAPTER.validate_json(self.event)
        assert isinstance(event, ImageReady | RenderError | RenderProgress), type(event)
        return event
