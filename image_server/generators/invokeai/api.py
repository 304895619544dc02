"""The InvokeAI REST calls this strategy makes, each translated into ``image_server.errors``.

One ``InvokeAIAPI`` per generator over its open httpx client (base URL = the server; an
optional token in the client's default headers). Routes per API_CONTRACTS.md section 9 and
InvokeAI's routers (``session_queue``, ``images``, ``boards``, ``model_manager``, ``app_info``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from image_server.errors import GenerationFailed
from image_server.generators.base import ReferenceImage
from image_server.generators.http import (
    download_all,
    error_for_status,
    parse_retry_after,
    scrub,
    translate_transport_errors,
)
from image_server.generators.invokeai.graph import ModelRef
from image_server.generators.invokeai.wire import (
    QueueItem,
    clip,
    decode_json,
    detail_of,
    malformed,
    parse_board_id,
    parse_boards,
    parse_enqueue,
    parse_image_name,
    parse_models,
    parse_queue_item,
    parse_queue_page,
)

QUEUE_PAGE = 100
MAX_QUEUE_PAGES = 50  # looking for our batch in a v4/v5 queue: give up past 5000 items


class InvokeAIAPI:
    def __init__(self, client: httpx.AsyncClient, *, generator: str, queue_id: str, secrets: tuple[str, ...]) -> None:
        self.client = client
        self.generator = generator
        self.queue = f"/api/v1/queue/{queue_id}"
        self.secrets = secrets

    async def call(self, method: str, path: str, *, what: str, expect: int = 200, **kwargs: Any) -> Any:
        """One request; the decoded JSON body of an ``expect`` answer, or the translated error."""
        with translate_transport_errors(self.generator, *self.secrets):
            response = await self.client.request(method, path, **kwargs)
        if response.status_code != expect and not (expect == 201 and response.status_code == 200):
            raise self.error_for(response, what)
        return decode_json(response.content, generator=self.generator, what=what)

    def error_for(self, response: httpx.Response, what: str) -> GenerationFailed:
        try:
            detail = detail_of(response.json())
        except ValueError:
            detail = response.text
        detail = clip(scrub(detail, *self.secrets))  # scrubbed before cut: no half key survives
        status = response.status_code
        if status == 404 and not response.headers.get("content-type", "").startswith("application/json"):
            # Something answers, but not InvokeAI's API (a wrong base_url or a proxy path).
            return malformed(self.generator, f"404 for {what}: is base_url an InvokeAI server?")
        if status == 422:
            detail = f"InvokeAI refused the {what}: {detail}"
        else:
            detail = f"{what}: {detail}" if detail else what
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        return error_for_status(status, detail, generator=self.generator, retry_after=retry_after)

    async def version(self) -> str:
        payload = await self.call("GET", "/api/v1/app/version", what="version request")
        version = payload.get("version") if isinstance(payload, dict) else None
        if not isinstance(version, str):
            raise malformed(self.generator, "a version request without a version")
        return version

    async def models(self, model_type: str) -> list[ModelRef]:
        payload = await self.call("GET", "/api/v2/models/", params={"model_type": model_type}, what="model list")
        return parse_models(payload, generator=self.generator)

    async def upload(self, reference: ReferenceImage) -> str:
        """Upload a reference as an intermediate user image; its ``image_name``."""
        files = {"file": (f"reference.{reference.format}", reference.data, reference.mime)}
        params = {"image_category": "user", "is_intermediate": "true"}
        payload = await self.call(
            "POST", "/api/v1/images/upload", params=params, files=files, expect=201, what="reference upload"
        )
        return parse_image_name(payload, generator=self.generator)

    async def boards(self) -> dict[str, str]:
        params = {"all": "true", "include_archived": "true"}
        payload = await self.call("GET", "/api/v1/boards/", params=params, what="board list")
        return parse_boards(payload, generator=self.generator)

    async def create_board(self, name: str) -> str:
        payload = await self.call(
            "POST", "/api/v1/boards/", params={"board_name": name}, expect=201, what="board creation"
        )
        return parse_board_id(payload, generator=self.generator)

    async def enqueue(self, batch: dict[str, Any]) -> tuple[str, list[int] | None]:
        payload = await self.call(
            "POST", f"{self.queue}/enqueue_batch", json={"batch": batch, "prepend": False}, what="graph"
        )
        return parse_enqueue(payload, generator=self.generator)

    async def item(self, item_id: int) -> QueueItem:
        payload = await self.call("GET", f"{self.queue}/i/{item_id}", what=f"queue item {item_id}")
        return parse_queue_item(payload, generator=self.generator)

    async def items_of_batch(self, batch_id: str, expected: int) -> list[int]:
        """The item ids of ``batch_id`` from the paginated ``/list`` (servers before 6.0 return none
        from enqueue_batch). New items come last, so walk from the start until all are found."""
        found: list[int] = []
        cursor: tuple[int, int] | None = None
        for _ in range(MAX_QUEUE_PAGES):
            params: dict[str, Any] = {"limit": QUEUE_PAGE}
            if cursor is not None:
                params |= {"cursor": cursor[0], "priority": cursor[1]}
            payload = await self.call("GET", f"{self.queue}/list", params=params, what="queue list")
            rows, has_more = parse_queue_page(payload, generator=self.generator)
            found += [item_id for item_id, batch, _ in rows if batch == batch_id]
            if len(found) >= expected or not has_more or not rows:
                break
            cursor = (rows[-1][0], rows[-1][2])
        if not found:
            raise malformed(self.generator, f"no queue items for the batch {batch_id} it just enqueued")
        return sorted(found)

    async def cancel(self, item_id: int) -> None:
        await self.call("PUT", f"{self.queue}/i/{item_id}/cancel", what=f"cancel of queue item {item_id}")

    async def cancel_batch(self, batch_id: str) -> None:
        """Cancel every item of our batch (when its item ids are not known yet)."""
        body = {"batch_ids": [batch_id]}
        await self.call("PUT", f"{self.queue}/cancel_by_batch_ids", json=body, what=f"cancel of batch {batch_id}")

    async def images(self, image_names: list[str]) -> list[bytes]:
        """The full-size files, downloaded concurrently (same server, so the client's token goes too)."""
        urls = [f"/api/v1/images/i/{quote(name, safe='')}/full" for name in image_names]
        with translate_transport_errors(self.generator, *self.secrets):
            return await download_all(self.client, urls, generator=self.generator)
