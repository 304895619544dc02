"""One ``/ws`` connection per generator, shared by its renders, with events routed by prompt id.

ComfyUI sends a client the events of every prompt posted with its client id, plus queue
``status`` broadcasts and binary preview frames. Keeping one socket open (as ComfyUI's own
front end does) saves a connection and a close handshake per render; a render subscribes
with the prompt id it chose *before* posting, so no event can arrive unrouted. When the
socket drops, every subscriber is told (``None``) and falls back to polling ``/history``;
the next render connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import deque
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

logger = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # preview frames of big renders
Event = dict[str, Any] | None  # None: the socket is gone
UNROUTED_KEPT = 1024  # recent events of prompts no render has claimed (yet), for ``rename``


class EventHub:
    def __init__(self, base_url: str, *, name: str, open_timeout: float) -> None:
        self.client_id = uuid.uuid4().hex
        self.url = "ws" + base_url.rstrip("/").removeprefix("http") + f"/ws?clientId={self.client_id}"
        self.name = name
        self.open_timeout = open_timeout
        self._subscribers: dict[str, asyncio.Queue[Event]] = {}
        self._unrouted: deque[tuple[str, dict[str, Any]]] = deque(maxlen=UNROUTED_KEPT)
        self._socket: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()

    async def subscribe(self, prompt_id: str) -> asyncio.Queue[Event] | None:
        """A queue of ``prompt_id``'s events, or None when no socket can be opened (poll instead)."""
        async with self._connecting:
            if self._socket is None:
                try:
                    self._socket = await connect(
                        self.url, max_size=MAX_MESSAGE_BYTES, open_timeout=self.open_timeout, compression=None
                    )
                except (WebSocketException, OSError, TimeoutError) as exc:
                    logger.warning("%s: no websocket (%s); polling /history instead", self.name, exc)
                    return None
                self._reader = asyncio.get_running_loop().create_task(self._read(self._socket))
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers[prompt_id] = queue
        return queue

    def unsubscribe(self, prompt_id: str) -> None:
        self._subscribers.pop(prompt_id, None)

    def rename(self, chosen: str, assigned: str) -> None:
        """The server ignored our prompt id (older ComfyUI) and gave another: route that one
        instead, replaying what already arrived for it."""
        queue = self._subscribers.pop(chosen, None)
        if queue is None or chosen == assigned:
            return
        self._subscribers[assigned] = queue
        for prompt_id, event in list(self._unrouted):
            if prompt_id == assigned:
                queue.put_nowait(event)

    async def _read(self, socket: ClientConnection) -> None:
        try:
            async for message in socket:
                if isinstance(message, bytes):
                    continue  # a preview image: 4-byte event type, 4-byte format, then the bytes
                try:
                    event = json.loads(message)
                    prompt_id = event["data"].get("prompt_id")
                except (ValueError, TypeError, KeyError, AttributeError):
                    logger.debug("%s: ignoring a websocket frame that is not an event", self.name)
                    continue
                if not isinstance(prompt_id, str):
                    continue  # queue status broadcasts
                queue = self._subscribers.get(prompt_id)
                if queue is not None:
                    queue.put_nowait(event)
                else:
                    self._unrouted.append((prompt_id, event))
        except (WebSocketException, OSError) as exc:
            logger.warning("%s: websocket lost (%s)", self.name, exc)
        finally:
            if self._socket is socket:
                self._socket = None
            for queue in self._subscribers.values():
                queue.put_nowait(None)

    async def aclose(self) -> None:
        reader, socket = self._reader, self._socket
        self._reader = self._socket = None
        if socket is not None:
            await socket.close()
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
