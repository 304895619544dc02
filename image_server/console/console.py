"""``Console``: the service seen as a client sees it, kept as state that web pages subscribe to."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import zmq.asyncio

from image_server.client import RenderClient, RenderFailed
from image_server.console.gallery import Gallery
from image_server.console.page import card_html, generators_html, running_html
from image_server.console.state import ConsoleState, Update
from image_server.console.thumbs import Thumbnails
from image_server.security import KeyPair
from schemas import ImageReady, ImageSource, RenderRequest

logger = logging.getLogger(__name__)

# A page that stops reading is dropped rather than letting its backlog grow without bound.
SUBSCRIBER_BACKLOG = 256
RELOAD = "event: reload\ndata: {}\n\n"  # the page fell behind: it reloads to catch up
CLOSE = ": closing\n\n"  # the console stops: the stream ends and the page's EventSource reconnects


class Console:
    """Watches every event of the service through a ``RenderClient`` (monitor mode) and sends
    the page's own requests and cancels through it, under its own ``reply_to``."""

    def __init__(
        self,
        requests_endpoint: str,
        events_endpoint: str,
        *,
        output_dir: Path,
        cache_dir: Path,
        context: zmq.asyncio.Context | None = None,
        recent: int = 60,
        status_interval_s: float = 2.0,
        curve_keys: KeyPair | None = None,
        curve_server_key: bytes | None = None,
    ) -> None:
        self.state = ConsoleState(output_dir, recent=recent)
        self.gallery = Gallery(output_dir)
        self.thumbnails = Thumbnails(output_dir, cache_dir)
        self.status_interval_s = status_interval_s
        self.client = RenderClient(
            requests_endpoint,
            events_endpoint,
            client_id=f"console-{uuid.uuid4().hex[:8]}",
            context=context,
            on_event=self._on_event,
            monitor=True,
            curve_keys=curve_keys,
            curve_server_key=curve_server_key,
        )
        self._subscribers: set[asyncio.Queue[str]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._exit = contextlib.AsyncExitStack()

    async def start(self) -> None:
        await self._exit.enter_async_context(self.client)
        await asyncio.to_thread(self.gallery.scan)
        self._spawn(self._poll_status(), "console:status")

    async def aclose(self) -> None:
        # Pages' event streams end first: an HTTP server waits for open responses to finish.
        for queue in list(self._subscribers):
            self._drop(queue, CLOSE)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._exit.aclose()

    # -- pages subscribe to updates ------------------------------------------------------

    def subscribe(self) -> asyncio.Queue[str]:
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=SUBSCRIBER_BACKLOG)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[str]) -> None:
        self._subscribers.discard(queue)

    def _publish(self, updates: list[Update]) -> None:
        for name, item in updates:
            message = f"event: {name}\ndata: {json.dumps(self._payload(name, item))}\n\n"
            for queue in list(self._subscribers):
                try:
                    queue.put_nowait(message)
                except asyncio.QueueFull:
                    logger.info("console: a page stopped reading; telling it to reload")
                    self._drop(queue, RELOAD)

    def _payload(self, name: str, item: Any) -> dict[str, Any]:
        """The JSON an update becomes on the page: HTML fragments rendered (and escaped) here."""
        if name == "card":
            return {"id": item.request_id, "html": card_html(item), "keep": self.state.cards.maxlen}
        if name == "running":
            return {"id": item.request_id, "html": running_html(item)}
        if name == "generators":
            return {"html": generators_html(item)}
        return {"id": item}

    def _drop(self, queue: asyncio.Queue[str], last: str) -> None:
        """End a page's stream; ``last`` is the final message it gets."""
        self._subscribers.discard(queue)
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(last)

    def _on_event(self, event: object) -> None:
        if isinstance(event, ImageReady):
            for image in event.images:
                relative = self.state.relative(image.path) if image.path else None
                if relative is not None:
                    self.gallery.add(relative, time.time())
        self._publish(self.state.apply(event))

    # -- what the page can do --------------------------------------------------------------

    async def submit(
        self, *, prompt: str, generator: str | None, width: int | None, height: int | None, image: bytes | None
    ) -> str:
        """Send a ``RenderRequest`` from the page's form; its events reach the page like any other."""
        request = RenderRequest(
            request_id=f"console-{uuid.uuid4().hex[:12]}",
            prompt=prompt,
            generator=generator or None,
            width=width,
            height=height,
            reference_image=ImageSource(frame=0) if image else None,
        )
        self.state.note_sent(request.request_id, prompt)
        self._spawn(self._render(request, [image] if image else []), f"console:render:{request.request_id}")
        return request.request_id

    async def cancel(self, request_id: str) -> bool:
        """Cancel a request this console sent; others' requests are theirs to cancel."""
        running = self.state.running.get(request_id)
        if running is None or not running.mine:
            return False
        await self.client.cancel(request_id)
        return True

    async def _render(self, request: RenderRequest, images: list[bytes]) -> None:
        # The outcome arrives through _on_event like every other event; here only the
        # waiting ends. A failure is a card on the page, not an error of the console.
        with contextlib.suppress(RenderFailed, TimeoutError):
            await self.client.render(request, images=images, timeout=3600)

    async def _poll_status(self) -> None:
        while True:
            try:
                await self.client.status(timeout=max(5.0, self.status_interval_s))
            except TimeoutError:
                logger.debug("console: no ServiceStatus answer yet")
            await asyncio.sleep(self.status_interval_s)

    def _spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
