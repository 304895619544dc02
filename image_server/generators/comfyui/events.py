"""One ``/ws`` connection per generator, shared by its renders, with events routed by prompt id.

ComfyUI sends a client the events of every prompt posted with its client id, plus queue
``status`` broadcasts and binary preview frames. Keeping one socket open (as ComfyUI's own
front end does) saves a connection and a close handshake per render; a render subscribes
with the prompt id it chose *before* posting, so no event can arrive unrouted, and only once
the server's first frame shows that it files the socket under our client id. When the
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

import aiohttp

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
        self._session: aiohttp.ClientSession | None = None
        self._socket: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()

    async def subscribe(self, prompt_id: str) -> asyncio.Queue[Event] | None:
        """A queue of ``prompt_id``'s events, or None when no socket can be opened (poll instead)."""
        async with self._connecting:
            if self._socket is None:
                if self._session is None:
                    self._session = aiohttp.ClientSession()
                socket = await self._open(self._session)
                if socket is None:
                    return None
                self._socket = socket
                self._reader = asyncio.get_running_loop().create_task(self._read(socket))
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers[prompt_id] = queue
        return queue

    async def _open(self, session: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse | None:
        """A socket the server routes our client id's events to, or None (poll instead).

        ComfyUI answers the handshake *before* it files the socket under our client id, then
        sends a ``status`` frame: a prompt posted in between would run with its events sent
        nowhere. Waiting for that first frame closes the gap.
        """
        timeout = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=self.open_timeout)
        socket: aiohttp.ClientWebSocketResponse | None = None
        try:
            async with asyncio.timeout(self.open_timeout):
                socket = await session.ws_connect(self.url, timeout=timeout, max_msg_size=MAX_MESSAGE_BYTES, compress=0)
                first = await socket.receive()
            if first.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                self._route(first)
                return socket
            problem = f"it closed before its first message ({socket.exception() or socket.close_code})"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            problem = str(exc) or type(exc).__name__
        logger.warning("%s: no websocket (%s); polling /history instead", self.name, problem)
        if socket is not None:
            await _close(socket, self.open_timeout)
        return None

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

    def _route(self, message: aiohttp.WSMessage) -> None:
        if message.type is not aiohttp.WSMsgType.TEXT:
            return  # binary: a preview image (4-byte event type, 4-byte format, bytes)
        try:
            event = json.loads(message.data)
            prompt_id = event["data"].get("prompt_id")
        except (ValueError, TypeError, KeyError, AttributeError):
            logger.debug("%s: ignoring a websocket frame that is not an event", self.name)
            return
        if not isinstance(prompt_id, str):
            return  # queue status broadcasts
        queue = self._subscribers.get(prompt_id)
        if queue is not None:
            queue.put_nowait(event)
        else:
            self._unrouted.append((prompt_id, event))

    async def _read(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for message in socket:  # ends on a close frame or a dropped connection
                self._route(message)
            if self._socket is socket:  # not closed by aclose(): the server went away
                logger.warning("%s: websocket closed (%s)", self.name, socket.exception() or socket.close_code)
        except (aiohttp.ClientError, OSError) as exc:
            logger.warning("%s: websocket lost (%s)", self.name, exc)
        finally:
            if self._socket is socket:
                self._socket = None
            for queue in self._subscribers.values():
                queue.put_nowait(None)

    async def aclose(self) -> None:
        reader, socket, session = self._reader, self._socket, self._session
        self._reader = self._socket = self._session = None
        if socket is not None:
            await _close(socket, self.open_timeout)
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if session is not None:
            await session.close()  # also drops a connection whose close handshake timed out


async def _close(socket: aiohttp.ClientWebSocketResponse, seconds: float) -> None:
    """The close handshake, bounded: aiohttp bounds the wait for the server's reply
    (``ws_close``) but not sending our close frame to a server that stopped reading."""
    try:
        async with asyncio.timeout(seconds):
            await socket.close()
    except TimeoutError:
        logger.debug("websocket close handshake timed out; dropping the connection")
