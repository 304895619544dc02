"""Answer a request from an earlier render: the result cache, and coalescing of identical
requests in flight (the first renders; the others wait for it and get its images).

Every request still gets its own terminal event (own request_id, metadata and delivery);
only the image bytes are shared, exactly as the first request got them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from image_server.cache.entry import CachedResult, capture
from image_server.cache.storage import CacheStorage
from image_server.errors import GenerationTimeout, ImageServerError
from image_server.storage import OutputStore
from schemas import ImageReady, OutputImage, RenderRequest, Timings

logger = logging.getLogger(__name__)


@dataclass
class Reused:
    """An answer built from another render's images."""

    event: ImageReady
    blobs: list[bytes]


Render = Callable[[], Awaitable[tuple[ImageReady, list[bytes]]]]


class ResultReuse:
    def __init__(self, storage: CacheStorage | None, store: OutputStore, *, default_project: str = "default") -> None:
        self.storage = storage
        self.store = store
        self.default_project = default_project
        self._in_flight: dict[str, asyncio.Future[CachedResult | None]] = {}
        self.counters = {"cache_hits": 0, "cache_misses": 0, "coalesced": 0}

    def stats(self) -> dict[str, int]:
        return {**self.counters, **(self.storage.stats() if self.storage is not None else {})}

    async def answer(
        self, request: RenderRequest, key: str, render: Render, *, received_at: float
    ) -> tuple[ImageReady, list[bytes]]:
        """The cached answer for ``key`` if there is one, else a share of an identical render
        in flight, else ``render()`` (whose result is then cached and shared)."""
        if self.storage is not None:
            hit = await self.storage.get(key)
            if hit is not None:
                self.counters["cache_hits"] += 1
                reused = await self._deliver(request, hit, received_at, cached=True)
                return reused.event, reused.blobs
            self.counters["cache_misses"] += 1
        while True:
            pending = self._in_flight.get(key)
            if pending is None:
                return await self._lead(request, key, render)
            try:
                async with asyncio.timeout(request.timeout_s):  # the follower's own deadline
                    shared = await asyncio.shield(pending)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # this request itself was cancelled
                continue  # the leader was cancelled (by its own client): render it ourselves
            except TimeoutError as exc:
                if isinstance(exc, ImageServerError):
                    raise  # the leader's own timeout, shared
                raise GenerationTimeout(
                    f"request did not finish within its timeout_s of {request.timeout_s:g} s "
                    f"(waiting for an identical request in flight)",
                    request_id=request.request_id,
                ) from exc
            if shared is None:  # the leader's images cannot be handed on (provider URLs)
                return await render()
            self.counters["coalesced"] += 1
            reused = await self._deliver(request, shared, received_at, cached=False)
            return reused.event, reused.blobs

    async def _lead(self, request: RenderRequest, key: str, render: Render) -> tuple[ImageReady, list[bytes]]:
        future: asyncio.Future[CachedResult | None] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            event, blobs = await render()
            captured = await asyncio.to_thread(capture, event, blobs, time.time())
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # followers re-raise it; nobody else must
            raise
        finally:
            if self._in_flight.get(key) is future:
                del self._in_flight[key]
        future.set_result(captured)
        if captured is not None and self.storage is not None:
            try:
                await self.storage.put(key, captured)
            except Exception:  # a full disk must not fail a render that succeeded
                logger.exception("! %s: storing it in the result cache failed", request.request_id)
        return event, blobs

    async def _deliver(
        self, request: RenderRequest, result: CachedResult, received_at: float, *, cached: bool
    ) -> Reused:
        start = time.perf_counter()
        described = [
            (i.data, OutputImage(width=i.width, height=i.height, format=i.format, seed=i.seed, sha256=i.sha256))
            for i in result.images
        ]
        project = request.project or self.default_project
        if request.delivery == "file":  # writes and fsyncs: off the loop
            stored = await asyncio.to_thread(
                self.store.deliver_encoded, request, result.generator, described, project=project
            )
        else:  # frames and inline only wrap bytes already in memory (base64 of a few MiB at most)
            stored = self.store.deliver_encoded(request, result.generator, described, project=project)
        done = time.perf_counter()
        images = [item.output for item in stored]
        event = ImageReady(
            request_id=request.request_id,
            generator=result.generator,
            images=images,
            uri=images[0].uri if images else None,
            prompt=result.prompt,
            timings=Timings(store=round((done - start) * 1000, 3), total=round((done - received_at) * 1000, 3)),
            attempts=0,
            applied=result.applied,
            ignored=result.ignored,
            metadata=request.metadata,
            cached=cached,
            cached_from=result.source_request_id,
        )
        return Reused(event, [item.blob for item in stored if item.blob is not None])
