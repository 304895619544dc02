"""InvokeAI (v4, v5, v6) through its REST API: build a graph, enqueue it, follow the queue items.

Flow per request: resolve the model (and LoRAs, FLUX components) through the models API,
find or create the project's board, upload the reference for image-to-image, enqueue one
batch (one queue item per image, seeds varied through batch data), poll each item with
backoff until ``completed``/``failed``/``canceled``, download the output node's images. A
cancellation or timeout cancels our queue items on the server, never anyone else's.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

from image_server.errors import GenerationFailed, ImageServerError
from image_server.formats import image_format_of
from image_server.generators.base import (
    Capabilities,
    GeneratedImage,
    GenerationResult,
    GeneratorConfig,
    HealthReport,
    RenderJob,
    check_request,
)
from image_server.generators.http import HTTPGenerator, read_api_key, scrub
from image_server.generators.invokeai.api import InvokeAIAPI
from image_server.generators.invokeai.config import InvokeAIConfig
from image_server.generators.invokeai.graph import SEED_MAX, SEED_NODE, build_graph
from image_server.generators.invokeai.models import ModelCatalog
from image_server.generators.invokeai.settings import settle
from image_server.generators.invokeai.wire import QueueItem, failure_text

logger = logging.getLogger(__name__)
STATUS_MESSAGES = {"pending": "queued", "waiting": "queued", "in_progress": "generating"}


class InvokeAIGenerator(HTTPGenerator):
    """SD1.5/SD2, SDXL and FLUX.1 text-to-image and image-to-image on an InvokeAI server."""

    strategy: ClassVar[str] = "invokeai"
    config_model: ClassVar[type[GeneratorConfig]] = InvokeAIConfig
    config: InvokeAIConfig
    _token = ""

    def __init__(
        self, config: GeneratorConfig, *, name: str | None = None, environ: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(config, name=name, environ=environ)
        self._cancels: set[asyncio.Task[None]] = set()
        self._boards: dict[str, tuple[float, str]] = {}
        self._board_lock = asyncio.Lock()
        self._api: InvokeAIAPI | None = None
        self._catalog: ModelCatalog | None = None

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            image_to_image=True,
            max_reference_images=1,
            loras=True,
            max_images=self.config.max_images,
            parameters=frozenset({"seed", "negative_prompt", "steps", "guidance_scale", "strength"}),
        )

    def read_credentials(self) -> None:
        if self.config.token_env is not None:
            token = read_api_key(self.config.token_env, generator=self.name, environ=self.environ)
            self._token = token.get_secret_value()

    async def open(self) -> None:
        if self._client is not None:
            return
        await super().open()
        client = self.require_open()
        if self._token:
            scheme = self.config.auth_scheme
            client.headers[self.config.auth_header] = f"{scheme} {self._token}" if scheme else self._token
        self._api = InvokeAIAPI(client, generator=self.name, queue_id=self.config.queue_id, secrets=self._secrets())
        self._catalog = ModelCatalog(self._api.models, generator=self.name, ttl_s=self.config.cache_ttl_s)

    async def generate(self, job: RenderJob) -> GenerationResult:
        api, catalog = self._require()
        request = job.request
        try:
            ignored = check_request(self.capabilities, request, self.name)
            model = await catalog.main_model(self.config.model, self.config.base)
            settled = await settle(self.config, job, model, catalog)
            board = self._board_name(request.project)
            board_id = await self._board_id(api, board) if board else None
            init_image = await api.upload(job.references[0]) if job.references else None
            spec = replace(settled.spec, board_id=board_id, init_image=init_image)
            ignored += [name for name in settled.ignored if name not in ignored]
            count = request.num_images
            seeds = [(spec.seed + i) % (SEED_MAX + 1) for i in range(count)]
            batch: dict[str, Any] = {"batch_id": uuid.uuid4().hex, "runs": 1}
            batch["graph"] = build_graph(spec, graph_id=f"image_server:{request.request_id}")
            if count > 1:
                batch["data"] = [[{"node_path": SEED_NODE, "field_name": "value", "items": seeds}]]
            items = await self._run(api, batch, count, job)
            outputs = [(output, seed) for item, seed in zip(items, seeds, strict=True) for output in item.images]
            downloaded = await api.images([output.image_name for output, _ in outputs])
            images = []
            for (output, seed), data in zip(outputs, downloaded, strict=True):
                fmt = image_format_of(data)
                if fmt is None:
                    raise GenerationFailed(f"{self.name}: InvokeAI returned an image that is not PNG, JPEG or WebP")
                images.append(
                    GeneratedImage(data=data, format=fmt, width=output.width, height=output.height, seed=seed)
                )
        except ImageServerError as exc:
            exc.request_id = exc.request_id or request.request_id
            exc.generator = exc.generator or self.name
            raise
        applied = settled.applied
        if board:
            applied["board"] = board
        return GenerationResult(images=images[:count], prompt=request.prompt, applied=applied, ignored=ignored)

    async def health(self) -> HealthReport:
        """The app version (the server answers) and the configured model (it is installed and usable)."""
        try:
            api, catalog = self._require()
            version = await api.version()
            catalog.invalidate()
            model = await catalog.main_model(self.config.model, self.config.base)
        except ImageServerError as exc:
            return HealthReport(ok=False, detail=str(exc))
        except RuntimeError as exc:  # not open
            return HealthReport(ok=False, detail=str(exc))
        return HealthReport(ok=True, detail=f"{self.name}: InvokeAI {version}; model {model.name} ({model.base})")

    async def aclose(self) -> None:
        for task in list(self._cancels):
            task.cancel()
        if self._cancels:
            await asyncio.gather(*self._cancels, return_exceptions=True)
        self._api = self._catalog = None
        await super().aclose()

    def _require(self) -> tuple[InvokeAIAPI, ModelCatalog]:
        self.require_open()
        assert self._api is not None and self._catalog is not None
        return self._api, self._catalog

    def _secrets(self) -> tuple[str, ...]:
        return (self._token,) if self._token else ()

    def _board_name(self, project: str | None) -> str | None:
        if self.config.project_boards and project:
            return project
        return self.config.board

    async def _board_id(self, api: InvokeAIAPI, name: str) -> str:
        """The board called ``name``, created on first use; one lookup at a time, so two requests
        for a new project make one board, not two."""
        async with self._board_lock:
            cached = self._boards.get(name)
            if cached is not None and time.monotonic() - cached[0] < self.config.cache_ttl_s:
                return cached[1]
            board_id = (await api.boards()).get(name)
            if board_id is None:
                board_id = await api.create_board(name)
                logger.info("%s: created InvokeAI board %r", self.name, name)
            self._boards[name] = (time.monotonic(), board_id)
            return board_id

    async def _run(self, api: InvokeAIAPI, batch: dict[str, Any], count: int, job: RenderJob) -> list[QueueItem]:
        """Enqueue and follow; on cancellation, cancel what was enqueued (bounded, shielded)."""
        item_ids: list[int] | None = None
        enqueue = asyncio.ensure_future(api.enqueue(batch))
        try:
            _, item_ids = await asyncio.shield(enqueue)
            if item_ids is None:  # InvokeAI before 6.0 does not say which items it made
                item_ids = await api.items_of_batch(batch["batch_id"], count)
            logger.debug("%s: %s enqueued as items %s", self.name, job.request.request_id, item_ids)
            return [
                await self._follow(api, item_id, job, number, len(item_ids)) for number, item_id in enumerate(item_ids)
            ]
        except asyncio.CancelledError:
            await self._cancel_remote(api, enqueue, item_ids, batch["batch_id"])
            raise
        except GenerationFailed:
            # A model or board may be gone or reinstalled under another key: look them up again next time.
            self._forget_lookups()
            raise

    async def _follow(self, api: InvokeAIAPI, item_id: int, job: RenderJob, number: int, total: int) -> QueueItem:
        """Poll one queue item with backoff until it ends; report its status changes as progress."""
        interval, last = self.config.poll_interval_s, ""
        while True:
            try:
                item = await api.item(item_id)
            except GenerationFailed as exc:
                if exc.status == 404:  # the queue was cleared or pruned under us: submitting again may work
                    raise GenerationFailed(
                        f"{self.name}: queue item {item_id} disappeared from the InvokeAI queue",
                        generator=self.name,
                        retryable=True,
                    ) from None
                raise
            if item.status == "completed":
                job.progress((number + 1) / total, "completed")
                return item
            if item.status == "failed":
                raise GenerationFailed(
                    f"{self.name}: InvokeAI failed queue item {item_id}: {scrub(failure_text(item), *self._secrets())}",
                    generator=self.name,
                    error_type=item.error_type,
                    retryable=False,
                )
            if item.status == "canceled":
                raise GenerationFailed(
                    f"{self.name}: queue item {item_id} was canceled on the InvokeAI server",
                    generator=self.name,
                    error_type="canceled",
                    retryable=False,
                )
            message = STATUS_MESSAGES.get(item.status, item.status)
            if total > 1:
                message = f"{message} (image {number + 1} of {total})"
            if message != last:
                job.progress(number / total if number else None, message)
                last = message
            await asyncio.sleep(interval)
            interval = min(interval * self.config.poll_backoff, self.config.poll_max_interval_s)

    def _forget_lookups(self) -> None:
        if self._catalog is not None:
            self._catalog.invalidate()
        self._boards.clear()

    async def _cancel_remote(
        self, api: InvokeAIAPI, enqueue: asyncio.Future[Any], item_ids: list[int] | None, batch_id: str
    ) -> None:
        """Cancel our items: by item id when known; else by our own batch id (the enqueue may have
        landed after we stopped waiting). Shielded from a second cancellation, bounded in time."""

        async def cancel() -> None:
            ids = item_ids
            if ids is None:
                try:
                    _, ids = await enqueue
                except Exception:  # the enqueue failed: nothing to cancel
                    return
            if ids is None:
                await api.cancel_batch(batch_id)
                return
            for item_id in ids:
                await api.cancel(item_id)

        task = asyncio.ensure_future(cancel())
        self._cancels.add(task)
        task.add_done_callback(self._forget_cancel)
        try:
            await asyncio.wait_for(asyncio.shield(task), self.config.cancel_timeout_s)
        except TimeoutError:
            logger.warning("%s: InvokeAI did not confirm the cancel of batch %s in time", self.name, batch_id)
        except Exception as exc:  # e.g. the item finished meanwhile
            logger.info("%s: cancelling batch %s failed: %s", self.name, batch_id, scrub(str(exc), *self._secrets()))
        else:
            logger.info("%s: cancelled InvokeAI batch %s", self.name, batch_id)

    def _forget_cancel(self, task: asyncio.Task[None]) -> None:
        self._cancels.discard(task)
        if not task.cancelled():
            task.exception()
