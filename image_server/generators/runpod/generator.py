"""RunPod serverless with worker-comfyui 5.x (API_CONTRACTS.md section 10).

The graph comes from the same workflow builder as the comfyui strategy; references travel in
``input.images`` (named, base64) and LoadImage nodes take those names. ``POST /run`` then
``/status`` polls with backoff (or ``/runsync``, polling on when it returns unfinished);
``/cancel`` on cancel or timeout. The job's queue and execution times go into the timings.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

import httpx

from image_server.errors import GenerationFailed, GenerationTimeout, GeneratorError, ImageServerError
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
    download,
    error_for_status,
    parse_retry_after,
    read_api_key,
    scrub,
    translate_transport_errors,
)
from image_server.generators.runpod.config import BASE_URL_ENV, DEFAULT_BASE_URL, RunPodConfig
from image_server.generators.runpod.wire import (
    TERMINAL,
    Job,
    error_text,
    fit_payload,
    output_images,
    parse_job,
    poll_delays,
    reference_name,
)
from image_server.generators.workflow import build_graph, workflow_capabilities

logger = logging.getLogger(__name__)
CANCEL_TIMEOUT_S = 10.0
STATUS_MESSAGES = {"IN_QUEUE": "queued at RunPod", "IN_PROGRESS": "running on RunPod"}


class RunPodGenerator(HTTPGenerator):
    strategy: ClassVar[str] = "runpod"
    config_model: ClassVar[type[GeneratorConfig]] = RunPodConfig
    config: RunPodConfig
    _key = ""
    _downloads: httpx.AsyncClient | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cancels: set[asyncio.Task[None]] = set()

    @property
    def capabilities(self) -> Capabilities:
        return workflow_capabilities(self.config)

    @property
    def base_url(self) -> str:
        return (self.config.base_url or self.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")

    def read_credentials(self) -> None:
        self._key = read_api_key(self.config.api_key_env, generator=self.name, environ=self.environ).get_secret_value()

    async def open(self) -> None:
        if self._client is not None:
            return
        self.read_credentials()
        seconds = self.config.request_timeout_s or self.config.timeout_s
        timeout = httpx.Timeout(seconds, connect=min(10.0, seconds))
        self._client = httpx.AsyncClient(base_url=f"{self.base_url}/{self.config.endpoint_id}", timeout=timeout)
        self._downloads = httpx.AsyncClient(timeout=timeout, follow_redirects=True)  # never sees the key

    async def generate(self, job: RenderJob) -> GenerationResult:
        client = self.require_open()
        request = job.request
        try:
            ignored = check_request(self.capabilities, request, self.name)
            names = [reference_name(request.request_id, i, "png") for i in range(1, len(job.references) + 1)]
            depth = reference_name(request.request_id, 0, "png") if job.depth_map else None
            built = await asyncio.to_thread(
                build_graph, self.config, request, reference_values=names, depth_value=depth
            )
            uploads = list(zip(names, job.references, strict=True))
            if depth is not None and job.depth_map is not None:
                uploads.append((depth, job.depth_map))
            limit, shrink = self.config.max_payload_bytes, self.config.shrink_references
            body, shrunk = await asyncio.to_thread(
                fit_payload, built.graph, uploads, limit=limit, shrink=shrink, generator=self.name
            )
            finished = await self._run(client, body, job)
            images = await self._images(finished)
        except ImageServerError as exc:
            exc.request_id = exc.request_id or request.request_id
            exc.generator = exc.generator or self.name
            exc.message = scrub(exc.message, self._key)
            raise
        if shrunk:
            built.applied["shrunk_references"] = shrunk
        if names:
            built.applied["reference_images"] = len(names)
        generated = [GeneratedImage(data=data, format=fmt, seed=built.seed) for data, fmt in images]
        timings = {
            key: value
            for key, value in (("provider_queue", finished.delay_ms), ("provider_execution", finished.execution_ms))
            if value is not None
        }
        return GenerationResult(
            generated, prompt=built.prompt, applied=built.applied, ignored=[*ignored, *built.ignored], timings=timings
        )

    async def _run(self, client: httpx.AsyncClient, body: bytes, job: RenderJob) -> Job:
        path = "/runsync" if self.config.mode == "runsync" else "/run"
        current = await self._call(client, "POST", path, content=body)
        try:
            config, said = self.config, ""
            delays = poll_delays(config.poll_interval_s, config.poll_backoff, config.poll_max_interval_s)
            while current.status not in TERMINAL:
                if (message := STATUS_MESSAGES.get(current.status, current.status)) != said:
                    job.progress(None, message)
                    said = message
                await asyncio.sleep(next(delays))
                current = await self._call(client, "GET", f"/status/{current.id}")
        except asyncio.CancelledError:
            self._cancel_soon(client, current.id)
            raise
        if current.status == "COMPLETED":
            return current
        if current.status == "FAILED":
            detail = scrub(error_text(current.error, current.output), self._key)
            raise GenerationFailed(f"{self.name}: the RunPod job failed: {detail}", error_type="FAILED")
        if current.status == "TIMED_OUT":
            raise GenerationTimeout(f"{self.name}: the RunPod job timed out on the endpoint (TIMED_OUT)")
        raise GenerationFailed(f"{self.name}: the RunPod job was cancelled on the endpoint", error_type="CANCELLED")

    async def _call(self, client: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> Job:
        headers = {"Authorization": f"Bearer {self._key}", "Content-Type": "application/json"}
        with translate_transport_errors(self.name, self._key):
            response = await client.request(method, path, headers=headers, **kwargs)
        if response.status_code != 200:
            detail = scrub(response.text, self._key)[:300]  # scrubbed before it is cut
            raise error_for_status(
                response.status_code, detail, generator=self.name, retry_after=_retry_after(response)
            )
        return parse_job(response.content, generator=self.name)

    async def _images(self, finished: Job) -> list[tuple[bytes, str]]:
        found = await asyncio.to_thread(output_images, finished.output, generator=self.name)
        images = []
        for item in found:
            data = item.data
            if data is None and item.url is not None:
                assert self._downloads is not None
                data = await download(self._downloads, item.url, generator=self.name)
            fmt = image_format_of(data or b"")
            if data is None or fmt is None:
                raise GenerationFailed(f"{self.name}: the RunPod job returned an output that is not an image")
            images.append((data, fmt))
        return images

    def _cancel_soon(self, client: httpx.AsyncClient, job_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._cancel(client, job_id))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel(self, client: httpx.AsyncClient, job_id: str) -> None:
        try:
            async with asyncio.timeout(CANCEL_TIMEOUT_S):
                await self._call(client, "POST", f"/cancel/{job_id}")
            logger.info("%s: cancelled RunPod job %s", self.name, job_id)
        except (ImageServerError, TimeoutError) as exc:
            logger.warning("%s: could not cancel RunPod job %s: %s", self.name, job_id, exc)

    async def health(self) -> HealthReport:
        if self._client is None:
            return HealthReport(ok=False, detail=f"{self.name}: generator is not open")
        try:
            with translate_transport_errors(self.name, self._key):
                response = await self._client.get("/health", headers={"Authorization": f"Bearer {self._key}"})
            if response.status_code != 200:
                raise error_for_status(response.status_code, "", generator=self.name)
            workers = response.json().get("workers", {})
        except GeneratorError as exc:
            return HealthReport(ok=False, detail=scrub(str(exc), self._key))
        except (ValueError, AttributeError):
            return HealthReport(ok=False, detail=f"{self.name}: /health answered with malformed JSON")
        return HealthReport(ok=True, detail=f"{self.name}: endpoint {self.config.endpoint_id} is up; workers {workers}")

    async def aclose(self) -> None:
        if self._cancels:
            await asyncio.wait(set(self._cancels), timeout=CANCEL_TIMEOUT_S)
        downloads, self._downloads = self._downloads, None
        if downloads is not None:
            await downloads.aclose()
        await super().aclose()


def _retry_after(response: httpx.Response) -> float | None:
    return parse_retry_after(response.headers.get("retry-after"))
