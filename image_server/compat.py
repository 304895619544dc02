"""Compatibility with controllers written for the installation this service comes from.

Such a controller binds PUSH (requests) and PULL (results) and speaks one frame of plain
JSON each way. ``PlainJsonPublisher`` sends only terminal events (a PULL controller has no
use for heartbeats or progress, and a PUSH socket must not block on them), one frame each,
with the request's own fields (``era``, ``biome``, ...) echoed back at the top level.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import zmq.asyncio
from pydantic import BaseModel

from image_server.audience import Audience
from image_server.config import ServiceConfig
from image_server.publisher import EventPublisher
from schemas import RenderRequest

logger = logging.getLogger(__name__)

TERMINAL_TYPES = frozenset({"ImageReady", "RenderError"})


class PlainJsonPublisher(EventPublisher):
    def __init__(
        self, socket: zmq.asyncio.Socket, *, service_id: str, echo_unknown_fields: bool, **kwargs: Any
    ) -> None:
        super().__init__(socket, service_id=service_id, **kwargs)
        self.echo_unknown_fields = echo_unknown_fields
        self._echo: dict[str, dict[str, Any]] = {}

    def remember(self, payload: bytes | bytearray | str) -> None:
        """Keep the fields of a request's JSON that the schema does not know, to echo them."""
        if not self.echo_unknown_fields:
            return
        try:
            data = json.loads(payload)
        except ValueError:
            return
        if not isinstance(data, dict) or not isinstance(data.get("request_id"), str):
            return
        unknown = {key: value for key, value in data.items() if key not in RenderRequest.model_fields}
        if unknown:
            self._echo[data["request_id"]] = unknown

    def wanted(self, event_type: str, topic: bytes) -> bool:
        return event_type in TERMINAL_TYPES  # the only events this profile sends

    def frames(self, event: BaseModel, topic: bytes, body: bytes, blobs: Sequence[bytes]) -> list[bytes] | None:
        if getattr(event, "type", None) not in TERMINAL_TYPES:
            return None
        echoed = self._echo.pop(getattr(event, "request_id", ""), None)
        if echoed:
            data = json.loads(body)
            for key, value in echoed.items():
                data.setdefault(key, value)  # the service's own fields win
            body = json.dumps(data).encode()
        return [body, *blobs]


def make_publisher(
    socket: zmq.asyncio.Socket,
    config: ServiceConfig,
    *,
    observer: Callable[[BaseModel], None] | None = None,
    audience: Audience | None = None,
) -> EventPublisher:
    """The publisher the config asks for: plain JSON for a compatibility profile, else topics."""
    compat = config.compat
    if compat.single_frame_events:
        return PlainJsonPublisher(
            socket,
            service_id=config.service_id,
            echo_unknown_fields=compat.echo_unknown_fields,
            observer=observer,
        )
    return EventPublisher(socket, service_id=config.service_id, observer=observer, audience=audience)
