"""ComfyUI: run a user-exported workflow on a ComfyUI server (API_CONTRACTS.md section 8).

Per request: upload the references into a subfolder of ComfyUI's input folder, build the graph
(mapping, placeholders, style, LoRA stack), open ``/ws`` with a fresh client id, ``POST
/prompt``, follow our prompt's events (falling back to ``/history`` polling if the socket
drops), and download the output images with ``/view``. A cancelled or timed-out request is
withdrawn: deleted from the queue if pending, interrupted (that prompt only) if running.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import httpx

from image_server.errors import GenerationFailed, GeneratorError, ImageServerError
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
from image_server.generators.comfyui.config import ComfyUIConfig
from image_server.generators.comfyui.events import EventHub
from image_server.generators.comfyui.follow import WebsocketLost, follow_events, poll_history
from image_server.generators.comfyui.wire import (
    OutputFile,
    describe_system,
    files_of,
    prompt_id_of,
    prompt_rejected,
    queue_ids,
    uploaded_name,
)
from image_server.generators.http import HTTPGenerator, error_for_status, translate_transport_errors
from image_server.generators.workflow import BuiltGraph, build_graph, workflow_capabilities

logger = logging.getLogger(__name__)
WITHDRAW_TIMEOUT_S = 10.0


class ComfyUIGenerator(HTTPGenerator):
    strategy: ClassVar[str] = "comfyui"
    config_model: ClassVar[type[GeneratorConfig]] = ComfyUIConfig
    config: ComfyUIConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._withdrawals: set[asyncio.Task[None]] = set()
        self._hub: EventHub | None = None

    async def open(self) -> None:
        await super().open()
        if self.config.websocket and self._hub is None:
            timeout = self.config.request_timeout_s or 10.0
            self._hub = EventHub(self.config.base_url, name=self.name, open_timeout=timeout)

    @property
    def capabilities(self) -> Capabilities:
        return workflow_capabilities(self.config)

    async def generate(self, job: RenderJob) -> GenerationResult:
        client = self.require_open()
        request = job.request
        try:
            ignored = check_request(self.capabilities, request, self.name)
            folder = f"{self.config.upload_subfolder}/{_safe(request.request_id)}-{uuid.uuid4().hex[:8]}"
            references = [await self._upload(client, ref, folder, f"ref{i}") for i, ref in enumerate(job.references, 1)]
            depth = await self._upload(client, job.depth_map, folder, "depth") if job.depth_map else None
            built = await asyncio.to_thread(
                build_graph, self.config, request, reference_values=references, depth_value=depth
            )
            images = await self._render(client, built, job)
        except ImageServerError as exc:
            exc.request_id = exc.request_id or request.request_id
            exc.generator = exc.generator or self.name
            raise
        if not images:
            raise GenerationFailed(
                f"{self.name}: the workflow finished without images from its output nodes "
                f"({', '.join(self.config.compiled().outputs)})",
                request_id=request.request_id,
                generator=self.name,
            )
        if references:
            built.applied["reference_images"] = len(references)
        return GenerationResult(images, prompt=built.prompt, applied=built.applied, ignored=[*ignored, *built.ignored])

    async def _upload(self, client: httpx.AsyncClient, image: ReferenceImage, folder: str, stem: str) -> str:
        files = {"image": (f"{stem}.{image.format}", image.data, image.mime)}
        form = {"subfolder": folder, "type": "input", "overwrite": "true"}
        with translate_transport_errors(self.name):
            response = await client.post("/upload/image", files=files, data=form)
        if response.status_code != 200:
            raise error_for_status(response.status_code, "uploading a reference image failed", generator=self.name)
        return uploaded_name(response.content, generator=self.name)

    async def _render(self, client: httpx.AsyncClient, built: BuiltGraph, job: RenderJob) -> list[GeneratedImage]:
        prompt_id = str(uuid.uuid4())  # chosen here: events are routed by it, and a cancel can withdraw it
        outputs = self.config.compiled().outputs
        # Downloads start at each output node's ``executed`` event, while the server still
        # finishes the prompt (history, status) before its final ``executing`` event.
        prefetch = _Prefetch(lambda file: self._download(client, file, built.seed))

        def on_output(node: str, output: dict[str, Any]) -> None:
            if node in outputs:
                prefetch.start(files_of({node: output}, (node,)))

        hub = self._hub
        events = await hub.subscribe(prompt_id) if hub is not None else None
        try:
            assigned = await self._submit(client, built, hub.client_id if hub else uuid.uuid4().hex, prompt_id)
            if assigned != prompt_id and hub is not None:
                hub.rename(prompt_id, assigned)
            prompt_id = assigned
            job.progress(None, "queued on ComfyUI")
            files: list[OutputFile] = []
            if events is not None:
                try:
                    found = await follow_events(
                        events,
                        prompt_id,
                        progress=job.progress,
                        on_output=on_output,
                        generator=self.name,
                        quiet_s=self.config.events_quiet_s,
                    )
                    files = files_of(found, outputs)
                except WebsocketLost:
                    logger.warning("%s: websocket lost; polling /history for %s", self.name, prompt_id)
            if not files:
                entry = await poll_history(client, prompt_id, interval=self.config.poll_interval_s, generator=self.name)
                if entry.error is not None:
                    raise entry.error
                files = files_of(entry.outputs, outputs)
            return await prefetch.collect(files)
        except asyncio.CancelledError:
            self._withdraw_soon(client, prompt_id)
            raise
        finally:
            await prefetch.cancel()
            if hub is not None:
                hub.unsubscribe(prompt_id)

    async def _submit(self, client: httpx.AsyncClient, built: BuiltGraph, client_id: str, prompt_id: str) -> str:
        body = {"prompt": built.graph, "client_id": client_id, "prompt_id": prompt_id}
        with translate_transport_errors(self.name):
            response = await client.post("/prompt", json=body)
        if response.status_code == 400:
            try:
                raise prompt_rejected(response.json(), generator=self.name)
            except ValueError:
                pass
        if response.status_code != 200:
            raise error_for_status(response.status_code, response.text[:300], generator=self.name)
        return prompt_id_of(response.content, generator=self.name)

    async def _download(self, client: httpx.AsyncClient, file: OutputFile, seed: int | None) -> GeneratedImage:
        with translate_transport_errors(self.name):
            response = await client.get("/view", params=file.query)
        if response.status_code != 200:
            raise error_for_status(response.status_code, f"downloading {file.filename} failed", generator=self.name)
        fmt = image_format_of(response.content)
        if fmt is None:
            raise GenerationFailed(f"{self.name}: /view returned {file.filename} in a format that is not an image")
        return GeneratedImage(data=response.content, format=fmt, seed=seed)

    def _withdraw_soon(self, client: httpx.AsyncClient, prompt_id: str) -> None:
        """Withdraw in a task of its own: the cancelled render must not wait for it."""
        task = asyncio.get_running_loop().create_task(self._withdraw(client, prompt_id))
        self._withdrawals.add(task)
        task.add_done_callback(self._withdrawals.discard)

    async def _withdraw(self, client: httpx.AsyncClient, prompt_id: str) -> None:
        """Delete ``prompt_id`` from the queue; interrupt it only if it is the one running."""
        try:
            async with asyncio.timeout(WITHDRAW_TIMEOUT_S):
                await client.post("/queue", json={"delete": [prompt_id]})
                response = await client.get("/queue")
                running, _ = queue_ids(response.content)
                if prompt_id in running:
                    # Older servers ignore prompt_id and interrupt whatever runs: hence the check.
                    await client.post("/interrupt", json={"prompt_id": prompt_id})
                    logger.info("%s: interrupted prompt %s", self.name, prompt_id)
        except (httpx.HTTPError, ValueError, TimeoutError) as exc:
            logger.warning("%s: could not withdraw prompt %s: %s", self.name, prompt_id, exc)

    async def health(self) -> HealthReport:
        if self._client is None:
            return HealthReport(ok=False, detail=f"{self.name}: generator is not open")
        try:
            with translate_transport_errors(self.name):
                response = await self._client.get("/system_stats")
            if response.status_code != 200:
                raise error_for_status(response.status_code, "/system_stats failed", generator=self.name)
            return HealthReport(ok=True, detail=f"{self.name}: {describe_system(response.content)}")
        except GeneratorError as exc:
            return HealthReport(ok=False, detail=str(exc))
        except ValueError:
            return HealthReport(ok=False, detail=f"{self.name}: /system_stats answered with malformed JSON")

    async def aclose(self) -> None:
        if self._withdrawals:
            await asyncio.wait(set(self._withdrawals), timeout=WITHDRAW_TIMEOUT_S)
        hub, self._hub = self._hub, None
        if hub is not None:
            await hub.aclose()
        await super().aclose()


class _Prefetch:
    """Downloads by output file, started as early as the file is known, each once."""

    def __init__(self, fetch: Callable[[OutputFile], Awaitable[GeneratedImage]]) -> None:
        self.fetch = fetch
        self.tasks: dict[OutputFile, asyncio.Task[GeneratedImage]] = {}

    def start(self, files: list[OutputFile]) -> None:
        for file in files:
            if file not in self.tasks:
                self.tasks[file] = asyncio.ensure_future(self.fetch(file))

    async def collect(self, files: list[OutputFile]) -> list[GeneratedImage]:
        self.start(files)
        return [await self.tasks[file] for file in files]

    async def cancel(self) -> None:
        """Stop what is still running (a failed or cancelled render); collected tasks are done."""
        pending = [task for task in self.tasks.values() if not task.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:64]
