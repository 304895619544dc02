"""Kie.ai Seedream v4: ``createTask``, then ``recordInfo`` polled with backoff, then the result
URLs downloaded at once (they expire). Plain httpx against API_CONTRACTS.md section 5.

Kie has no cancel endpoint: a task we stop waiting for (cancel, timeout) runs on at Kie and
is billed; we say so in the log. The key goes only to Kie's API and upload hosts, per request,
never as a client default, so result downloads from Kie's CDN never carry it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

import httpx

from image_server.errors import (
    GenerationFailed,
    GenerationTimeout,
    GeneratorError,
    ImageServerError,
)
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
from image_server.generators.http import (
    HTTPGenerator,
    download_all,
    read_api_key,
    translate_transport_errors,
)
from image_server.generators.kie.config import MAX_REFERENCES, KieConfig
from image_server.generators.kie.errors import read_envelope, task_failure
from image_server.generators.kie.uploads import reference_urls
from image_server.generators.kie.wire import PENDING_STATES, TaskRecord, build_task, read_record, task_id_of

logger = logging.getLogger(__name__)
CREATE_PATH = "/api/v1/jobs/createTask"
RECORD_PATH = "/api/v1/jobs/recordInfo"
CREDIT_PATH = "/api/v1/chat/credit"  # "Get Remaining Credits" (docs.kie.ai common API)
# Polls that fail transiently (429, 455, 5xx, a dropped connection) in a row before the last
# error is reported; re-creating the task instead would bill it twice.
MAX_POLL_ERRORS = 5
DOWNLOAD_TRIES = 3


class KieGenerator(HTTPGenerator):
    """Text-to-image with ``text_model``; with references, edit with ``edit_model``."""

    strategy: ClassVar[str] = "kie"
    config_model: ClassVar[type[GeneratorConfig]] = KieConfig
    config: KieConfig
    _key = ""  # set by open()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            image_to_image=True,
            max_reference_images=MAX_REFERENCES,
            max_images=6,
            max_prompt_chars=self.config.max_prompt_chars,
            parameters=frozenset({"seed"}),
        )

    def read_credentials(self) -> None:
        self._key = read_api_key(self.config.api_key_env, generator=self.name, environ=self.environ).get_secret_value()

    @property
    def _auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self._key}"}

    async def generate(self, job: RenderJob) -> GenerationResult:
        client = self.require_open()
        config, request = self.config, job.request
        try:
            ignored = check_request(self.capabilities, request, self.name)
            urls, uploaded = await reference_urls(
                client, config, request, job.references, key=self._key, generator=self.name
            )
            task = build_task(config, request, urls)
            with translate_transport_errors(self.name, self._key):
                response = await client.post(CREATE_PATH, json=task.body, headers=self._auth)
            task_id = task_id_of(read_envelope(response, generator=self.name, key=self._key), generator=self.name)
            logger.debug("%s: %s is Kie task %s", self.name, request.request_id, task_id)
            result_urls = await self._wait(client, task_id, job)
            job.progress(None, "downloading")
            blobs = await self._download(client, list(result_urls[: request.num_images]))
        except ImageServerError as exc:
            exc.request_id = exc.request_id or request.request_id
            exc.generator = exc.generator or self.name
            raise
        images = []
        for data in blobs:
            fmt = image_format_of(data)
            if fmt is None:
                raise GenerationFailed(
                    f"{self.name}: a result image is not PNG, JPEG or WebP",
                    generator=self.name,
                    request_id=request.request_id,
                )
            images.append(GeneratedImage(data=data, format=fmt, seed=request.seed))
        applied: dict[str, Any] = {**task.applied, "task_id": task_id}
        if job.references:
            applied["reference_uploads"] = uploaded
        if len(images) < request.num_images:
            applied["images_returned"] = len(images)
        return GenerationResult(images=images, prompt=task.prompt, applied=applied, ignored=ignored)

    async def _wait(self, client: httpx.AsyncClient, task_id: str, job: RenderJob) -> tuple[str, ...]:
        """Poll until the task succeeds (its result URLs) or fails (raised), with backoff."""
        config = self.config
        interval, state, errors = config.poll_interval_s, "", 0
        try:
            while True:
                await asyncio.sleep(interval)
                interval = min(interval * config.poll_backoff, config.poll_max_interval_s)
                try:
                    record = await self._record(client, task_id)
                except (GenerationFailed, GenerationTimeout) as exc:
                    errors += 1
                    if not exc.retryable or errors >= MAX_POLL_ERRORS:
                        raise
                    logger.info("%s: polling task %s failed (%s); polling on", self.name, task_id, exc)
                    interval = max(interval, getattr(exc, "retry_after", None) or 0.0)
                    continue
                errors = 0
                if record.state == "success":
                    return record.urls
                if record.state == "fail":
                    raise task_failure(record.fail_code, record.fail_message, generator=self.name, key=self._key)
                if record.state not in PENDING_STATES:
                    logger.debug("%s: task %s is in unknown state %r; polling on", self.name, task_id, record.state)
                if record.state != state:  # waiting, queuing, generating as progress messages
                    state = record.state
                    job.progress(None, state)
        except asyncio.CancelledError:
            logger.info("%s: stopped waiting for Kie task %s; Kie has no cancel, so it runs on", self.name, task_id)
            raise

    async def _download(self, client: httpx.AsyncClient, urls: list[str]) -> list[bytes]:
        """The results, fetched now (the URLs expire). A transient failure is tried again here, at
        most twice: a retry by the manager would make (and bill) a new task. 403/404 are final."""
        for attempt in range(1, DOWNLOAD_TRIES + 1):
            try:
                return await download_all(client, urls, generator=self.name)
            except (GenerationFailed, GenerationTimeout) as exc:
                if not exc.retryable or attempt == DOWNLOAD_TRIES:
                    raise
                logger.info("%s: downloading a result failed (%s); trying again", self.name, exc)
                await asyncio.sleep(min(1.0, self.config.poll_interval_s))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _record(self, client: httpx.AsyncClient, task_id: str) -> TaskRecord:
        with translate_transport_errors(self.name, self._key):
            response = await client.get(RECORD_PATH, params={"taskId": task_id}, headers=self._auth)
        return read_record(read_envelope(response, generator=self.name, key=self._key), generator=self.name)

    async def health(self) -> HealthReport:
        """The credit balance: checks reachability and the key, and that renders can be paid for."""
        if self._client is None:
            try:
                self.read_credentials()
            except GeneratorError as exc:
                return HealthReport(ok=False, detail=str(exc))
            return HealthReport(ok=False, detail=f"{self.name}: generator is not open")
        try:
            with translate_transport_errors(self.name, self._key):
                response = await self._client.get(CREDIT_PATH, headers=self._auth)
            credits = read_envelope(response, generator=self.name, key=self._key)
        except GeneratorError as exc:
            return HealthReport(ok=False, detail=str(exc))
        if not isinstance(credits, int | float) or isinstance(credits, bool):
            return HealthReport(ok=False, detail=f"{self.name}: key accepted, but the credit balance is unreadable")
        if credits <= 0:
            return HealthReport(ok=False, detail=f"{self.name}: key accepted, but no credits are left ({credits:g})")
        return HealthReport(ok=True, detail=f"{self.name}: key accepted; {credits:g} credits left")
