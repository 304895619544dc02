"""Runware over REST: one ``imageInference`` task per render, references through ``imageUpload``.

Plain httpx (API_CONTRACTS.md section 7). Every call is a JSON array of tasks POSTed to
``base_url``, with the key in an ``Authorization: Bearer`` header; answers are matched to
our tasks by ``taskUUID``. Result URLs (output type ``URL``) are fetched without the key.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import Any, ClassVar

import httpx

from image_server.errors import ContentPolicy, GenerationFailed, GeneratorError, ImageServerError
from image_server.formats import image_format_of
from image_server.generators.base import (
    Capabilities,
    GeneratedImage,
    GenerationResult,
    GeneratorConfig,
    HealthReport,
    ReferenceImage,
    RenderJob,
    check_request,
)
from image_server.generators.http import (
    HTTPGenerator,
    decode_base64_image,
    decode_data_uri,
    download_all,
    json_or_none,
    parse_retry_after,
    poll_answers,
    read_api_key,
    translate_transport_errors,
)
from image_server.generators.runware.config import RunwareConfig
from image_server.generators.runware.wire import (
    Result,
    build_task,
    data_uri,
    items_for,
    new_task_uuid,
    read_results,
    runware_error,
    upload_tasks,
)

logger = logging.getLogger(__name__)


class RunwareGenerator(HTTPGenerator):
    """Text-to-image, image-to-image (``seedImage``) or reference images, with LoRAs, on one model."""

    strategy: ClassVar[str] = "runware"
    config_model: ClassVar[type[GeneratorConfig]] = RunwareConfig
    config: RunwareConfig
    _key = ""

    @property
    def capabilities(self) -> Capabilities:
        config = self.config
        return Capabilities(
            image_to_image=True,
            max_reference_images=1 if config.reference_mode == "seed_image" else config.max_reference_images,
            loras=config.loras,
            min_size=config.min_size,
            max_size=config.max_size,
            max_images=config.max_images,
            parameters=frozenset({"seed", "negative_prompt", "steps", "guidance_scale", "strength"}),
        )

    def read_credentials(self) -> None:
        self._key = read_api_key(self.config.api_key_env, generator=self.name, environ=self.environ).get_secret_value()

    async def generate(self, job: RenderJob) -> GenerationResult:
        client = self.require_open()
        config, request = self.config, job.request
        try:
            ignored = check_request(self.capabilities, request, self.name)
            output_type = "URL" if request.delivery == "url" else config.output_type
            references = await self._references(client, job.references)
            built = build_task(
                job, config, ignored=ignored, images=references, output_type=output_type, generator=self.name
            )
            items = await self._infer(client, built.task, job)
            results = read_results(items[: request.num_images], generator=self.name)
            flagged = sum(result.nsfw for result in results)
            if flagged and config.refuse_nsfw:
                raise ContentPolicy(
                    f"{self.name}: Runware flagged {flagged} of {len(results)} images as NSFW",
                    error_type="NSFWContent",
                    generator=self.name,
                )
            images = await self._images(client, results, pass_urls=request.delivery == "url")
        except ImageServerError as exc:
            exc.request_id = exc.request_id or request.request_id
            exc.generator = exc.generator or self.name
            raise
        if config.upload == "image_upload" and references:
            built.applied["reference_upload"] = "image_upload"
        return GenerationResult(images=images, prompt=request.prompt, applied=built.applied, ignored=built.ignored)

    async def health(self) -> HealthReport:
        """A dry run of a small task (``X-Runware-Dry-Run: 1``: validated and priced, not run, not billed)."""
        if self._client is None:
            try:
                self.read_credentials()
            except GeneratorError as exc:
                return HealthReport(ok=False, detail=str(exc))
            return HealthReport(ok=False, detail=f"{self.name}: generator is not open")
        if self.config.health_check == "key":
            return HealthReport(ok=True, detail=f"{self.name}: key present; not verified (health_check = 'key')")
        task_uuid = new_task_uuid()
        task = {
            "taskType": "imageInference",
            "taskUUID": task_uuid,
            "model": self.config.model,
            "positivePrompt": "health check",
            "width": 512,
            "height": 512,
            "numberResults": 1,
        }
        try:
            await self._post(self._client, [task], task_uuid, headers={"X-Runware-Dry-Run": "1"})
        except GeneratorError as exc:
            return HealthReport(ok=False, detail=str(exc))
        return HealthReport(ok=True, detail=f"{self.name}: key and model {self.config.model} accepted (dry run)")

    async def _post(
        self,
        client: httpx.AsyncClient,
        tasks: list[dict[str, Any]],
        task_uuid: str,
        headers: dict[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """POST a task array; the data items of ``task_uuid``, or its errors raised as ours."""
        response, payload = await self._send(client, tasks, headers)
        return self._items_of(response, payload, task_uuid)

    async def _send(
        self, client: httpx.AsyncClient, tasks: list[dict[str, Any]], headers: dict[str, str] | None = None
    ) -> tuple[httpx.Response, Any]:
        # The endpoint is base_url itself (a relative "" would gain a trailing slash).
        auth = {"authorization": f"Bearer {self._key}", **(headers or {})}
        with translate_transport_errors(self.name, self._key):
            response = await client.post(self.config.base_url, json=tasks, headers=auth)
        return response, json_or_none(response)

    def _items_of(self, response: httpx.Response, payload: Any, task_uuid: str) -> list[dict[str, Any]]:
        items, errors = items_for(payload, task_uuid)
        if response.status_code >= 400 or errors:
            raise runware_error(
                response.status_code,
                errors,
                response.text if payload is None else "",
                generator=self.name,
                key=self._key,
                retry_after=parse_retry_after(response.headers.get("retry-after")),
            )
        if payload is None:
            raise GenerationFailed(f"{self.name}: Runware answered with malformed JSON", generator=self.name)
        return items

    async def _references(self, client: httpx.AsyncClient, references: list[ReferenceImage]) -> list[str]:
        """The references as Runware takes them: imageUUIDs after one ``imageUpload`` call, or data URIs."""
        if not references:
            return []
        uris = [await asyncio.to_thread(data_uri, ref.data, ref.mime) for ref in references]
        if self.config.upload == "inline":
            return uris
        tasks = upload_tasks(uris)
        response, payload = await self._send(client, tasks)  # one call carries every upload
        uuids = []
        for task in tasks:
            items = self._items_of(response, payload, task["taskUUID"])
            image_uuid = items[0].get("imageUUID") if items else None
            if not isinstance(image_uuid, str) or not image_uuid:
                raise GenerationFailed(f"{self.name}: the image upload answer has no imageUUID", generator=self.name)
            uuids.append(image_uuid)
        return uuids

    async def _infer(self, client: httpx.AsyncClient, task: dict[str, Any], job: RenderJob) -> list[dict[str, Any]]:
        """Run the task: the sync answer carries the images; an async one is polled with getResponse."""
        task_uuid = task["taskUUID"]
        items = await self._post(client, [task], task_uuid)
        if self.config.delivery_method == "sync":
            if not items:
                raise GenerationFailed(f"{self.name}: Runware answered without a result", generator=self.name)
            return items
        config = self.config
        poll = [{"taskType": "getResponse", "taskUUID": task_uuid}]
        answers = poll_answers(
            lambda: self._post(client, poll, task_uuid),
            first=config.poll_interval_s,
            factor=config.poll_backoff,
            cap=config.poll_max_interval_s,
            tolerated=config.poll_failures_tolerated,  # the task runs on (and is billed): wait a passing failure out
            what=f"{self.name}: task {task_uuid}",
        )
        async with aclosing(answers):
            async for items in answers:
                failed = [item for item in items if item.get("status") == "error"]
                if failed:
                    raise runware_error(200, failed, "the task failed", generator=self.name, key=self._key)
                done = [item for item in items if item.get("status") == "success"]
                if len(done) >= task["numberResults"]:
                    return done
                job.progress(len(done) / task["numberResults"] if done else None, "processing")
        raise AssertionError("poll_answers ends only by raising")  # for the type checker

    async def _images(
        self, client: httpx.AsyncClient, results: list[Result], *, pass_urls: bool
    ) -> list[GeneratedImage]:
        if pass_urls:
            return [GeneratedImage(url=r.encoded, seed=r.seed) for r in results]
        urls = [r.encoded for r in results if r.kind == "URL"]
        downloaded = iter(await download_all(client, urls, generator=self.name) if urls else [])
        images = []
        for result in results:
            if result.kind == "URL":
                data = next(downloaded)
            elif result.kind == "dataURI":
                data = await asyncio.to_thread(decode_data_uri, result.encoded, generator=self.name)
            else:
                data = await asyncio.to_thread(decode_base64_image, result.encoded, generator=self.name)
            fmt = image_format_of(data)
            if fmt is None:
                raise GenerationFailed(f"{self.name}: a result image is not PNG, JPEG or WebP", generator=self.name)
            images.append(GeneratedImage(data=data, format=fmt, seed=result.seed))
        return images
