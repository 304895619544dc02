"""fal.ai strategy: one configured endpoint, through fal's queue (submit, poll, result) or run API.

The strategy speaks fal's HTTP APIs itself (queue.py, storage.py) with httpx clients built from
its own config: hosts, proxy and CA bundle are per generator, and each call is made once so that
``image_server.resilience`` owns retries (and honours ``Retry-After``). The wire contract is
providers/API_CONTRACTS.md section 1.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from collections.abc import Mapping
from typing import Any, ClassVar

import httpx

from image_server.errors import GeneratorUnavailable
from image_server.generators.base import (
    Capabilities,
    GenerationResult,
    Generator,
    HealthReport,
    ReferenceImage,
    RenderJob,
    check_request,
)
from image_server.generators.fal.config import KNOWN_ENDPOINTS, EndpointSpec, FalConfig
from image_server.generators.fal.errors import secrets_of, translate_fal_errors
from image_server.generators.fal.queue import FalQueue, QueuedRequest, QueueStatus
from image_server.generators.fal.storage import FalStorage
from image_server.generators.fal.wire import build_arguments, fetch_images, parse_output
from image_server.generators.http import read_api_key, scrub

__all__ = ["KNOWN_ENDPOINTS", "EndpointSpec", "FalConfig", "FalGenerator"]

logger = logging.getLogger(__name__)
USER_AGENT = "image-server (fal queue API)"
MAX_LOG_CHARS = 300


def status_message(status: QueueStatus) -> str:
    if status.state == "IN_QUEUE":
        return f"queued at fal, position {status.queue_position}"
    return "generating" if status.state == "IN_PROGRESS" else "completed"


class FalGenerator(Generator):
    """Renders through one fal endpoint; see ``FalConfig`` for the knobs."""

    strategy: ClassVar[str] = "fal"
    config_model: ClassVar[type[FalConfig]] = FalConfig
    config: FalConfig

    # Set by open(); the base constructor checks the config and keeps ``environ``.
    _key = ""
    _api: httpx.AsyncClient | None = None  # carries the fal key: queue, run and rest hosts only
    _http: httpx.AsyncClient | None = None  # no credentials: result downloads, CDN and GCS uploads
    _queue: FalQueue | None = None
    _storage: FalStorage | None = None

    def __init__(self, config: FalConfig, *, name: str | None = None, environ: Mapping[str, str] | None = None) -> None:
        super().__init__(config, name=name, environ=environ)
        # Remote cancels still running when the request task has moved on; closed in aclose().
        self._cancels: set[asyncio.Task[None]] = set()

    @property
    def capabilities(self) -> Capabilities:
        return self.config.spec.capabilities()

    async def open(self) -> None:
        """Read the key from ``api_key_env`` and create this generator's clients."""
        if self._api is not None:
            return
        config = self.config
        self._key = read_api_key(config.api_key_env, generator=self.name, environ=self.environ).get_secret_value()
        # A CA bundle is trusted by this generator's clients only, never by the process.
        verify: ssl.SSLContext | bool = True
        if config.ca_bundle is not None:
            try:
                verify = await asyncio.to_thread(ssl.create_default_context, cafile=config.ca_bundle)
            except (OSError, ssl.SSLError) as exc:
                raise GeneratorUnavailable(
                    f"generator {self.name!r}: cannot read ca_bundle {config.ca_bundle}: {exc}", generator=self.name
                ) from exc
        common: dict[str, Any] = {"verify": verify, "proxy": config.proxy, "headers": {"User-Agent": USER_AGENT}}
        self._api = httpx.AsyncClient(timeout=config.request_timeout_s, **common)
        self._api.headers["Authorization"] = f"Key {self._key}"
        self._http = httpx.AsyncClient(timeout=config.download_timeout_s, follow_redirects=True, **common)
        secrets = secrets_of(self._key)
        self._queue = FalQueue(
            self._api, queue_url=config.queue_url, run_url=config.run_url, generator=self.name, secrets=secrets
        )
        self._storage = FalStorage(
            self._api,
            self._http,
            rest_url=config.rest_url,
            cdn_url=config.cdn_url,
            generator=self.name,
            secrets=secrets,
        )

    async def generate(self, job: RenderJob) -> GenerationResult:
        """Render one job. Raises ``Unsupported``, ``ContentPolicy``, ``RateLimited``,
        ``GenerationFailed`` or ``GenerationTimeout``; a cancellation also cancels the fal request."""
        queue, storage, http = self._require_open()
        request = job.request
        config = self.config
        ignored = check_request(config.spec.capabilities(), request, self.name)
        rid = request.request_id
        image_url = upload_mode = None
        with translate_fal_errors(self.name, self._key, request_id=rid):
            if job.references:
                image_url, upload_mode = await self._reference_url(storage, config, job.references[0])
            built = build_arguments(config, request, image_url=image_url, ignored=ignored)
            if upload_mode is not None:
                built.applied["reference_upload"] = upload_mode
            if config.mode == "run":
                job.progress(None, "generating")
                output = await queue.run(config.endpoint, built.arguments)
            else:
                output = await self._run_queue(queue, config, built.arguments, job)
            parsed = parse_output(output, generator=self.name, request_id=rid)
            images = await fetch_images(
                http,
                parsed,
                pass_urls=request.delivery == "url",
                requested_format=built.output_format,
                generator=self.name,
            )
        job.progress(1.0, "completed")  # only now: a result that fails to parse or download is no completion
        if parsed.seed is not None:
            built.applied["seed"] = parsed.seed
        return GenerationResult(
            images=images, prompt=parsed.prompt or request.prompt, applied=built.applied, ignored=built.ignored
        )

    async def health(self) -> HealthReport:
        """fal has no authenticated no-op. ``storage_token`` asks ``rest_url`` for an upload token
        (free, authenticated, no side effect beyond the token); ``key`` only checks the key is set."""
        env = self.config.api_key_env
        if not self.environ.get(env, "").strip():
            return HealthReport(ok=False, detail=f"no API key in the environment variable {env}")
        if self.config.health_check == "key":
            return HealthReport(
                ok=True, detail=f"API key present in {env}; not verified (fal.ai has no authenticated no-op)"
            )
        opened_here = self._api is None
        try:
            await self.open()
        except GeneratorUnavailable as exc:
            return HealthReport(ok=False, detail=str(exc))
        _, storage, _ = self._require_open()
        try:
            with translate_fal_errors(self.name, self._key):
                await storage.token()
        except Exception as exc:
            status = getattr(exc, "status", None)
            if status in (401, 403):
                return HealthReport(ok=False, detail=f"fal rejected the key in {env} (HTTP {status})")
            detail = scrub(f"fal storage token check at {self.config.rest_url} failed: {exc}", *secrets_of(self._key))
            return HealthReport(ok=False, detail=detail)
        finally:
            if opened_here:
                await self.aclose()
        return HealthReport(ok=True, detail="key accepted by fal (storage token); the endpoint itself is not checked")

    async def aclose(self) -> None:
        """Stop pending remote cancels and close the clients."""
        for task in list(self._cancels):
            task.cancel()
        if self._cancels:
            await asyncio.gather(*self._cancels, return_exceptions=True)
        clients = (self._api, self._http)
        self._api = self._http = self._queue = self._storage = None
        for client in clients:
            if client is not None:
                await client.aclose()

    def _require_open(self) -> tuple[FalQueue, FalStorage, httpx.AsyncClient]:
        if self._queue is None or self._storage is None or self._http is None:
            raise RuntimeError(f"generator {self.name!r} is not open; use 'async with generator:'")
        return self._queue, self._storage, self._http

    async def _reference_url(
        self, storage: FalStorage, config: FalConfig, reference: ReferenceImage
    ) -> tuple[str, str]:
        """A data URI for small images (no extra round trip), a fal storage URL for big ones."""
        mode = config.upload
        if mode == "auto":
            mode = "storage" if len(reference.data) > config.upload_threshold_bytes else "data_uri"
        if mode == "storage":
            return await storage.upload(reference.data, reference.mime, f"reference.{reference.format}"), mode
        encoded = await asyncio.to_thread(base64.b64encode, reference.data)
        return f"data:{reference.mime};base64,{encoded.decode('ascii')}", mode

    async def _run_queue(self, queue: FalQueue, config: FalConfig, arguments: dict[str, Any], job: RenderJob) -> Any:
        """Submit, report queue position, state changes and (if configured) fal's log lines as
        progress, then fetch the result; cancel remotely if cancelled."""
        handle = await self._submit(queue, config, arguments)
        logger.debug("%s: submitted %s as fal request %s", self.name, config.endpoint, handle.request_id)
        try:
            last: str | None = None
            logs_seen = 0
            while True:
                status = await queue.status(handle, logs=config.progress_logs)
                message = status_message(status)
                if message != last and status.state != "COMPLETED":
                    job.progress(None, message, queue_position=status.queue_position)
                    last = message
                # fal sends every log line so far on each poll; report the new ones.
                for line in status.logs[logs_seen:]:
                    job.progress(None, scrub(line, *secrets_of(self._key))[:MAX_LOG_CHARS])
                logs_seen = max(logs_seen, len(status.logs))
                if status.state == "COMPLETED":
                    return await queue.result(handle)
                await asyncio.sleep(config.poll_interval_s)
        except asyncio.CancelledError:
            await self._cancel_remote(queue, handle, config.cancel_timeout_s)
            raise

    async def _submit(self, queue: FalQueue, config: FalConfig, arguments: dict[str, Any]) -> QueuedRequest:
        """Submit. A cancellation that lands mid-submit still waits (bounded) for the request id
        and cancels the request, so no render nobody wants keeps running (and costing) at fal."""
        # fal refuses request timeouts of 1 s or less.
        start_timeout = config.timeout_s if config.timeout_s > 1 else None
        submit = asyncio.ensure_future(queue.submit(config.endpoint, arguments, start_timeout=start_timeout))
        try:
            return await asyncio.shield(submit)
        except asyncio.CancelledError:
            try:
                handle = await asyncio.wait_for(submit, config.cancel_timeout_s)
            except Exception:  # a failed or slow submit: there is nothing to cancel
                pass
            else:
                await self._cancel_remote(queue, handle, config.cancel_timeout_s)
            raise

    async def _cancel_remote(self, queue: FalQueue, handle: QueuedRequest, timeout: float) -> None:
        """Best effort PUT cancel_url, shielded from a second cancellation and bounded by ``timeout``."""
        task = asyncio.ensure_future(queue.cancel(handle))
        self._cancels.add(task)
        task.add_done_callback(self._forget_cancel)
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            logger.warning("%s: fal did not confirm cancelling %s within %.1fs", self.name, handle.request_id, timeout)
        except Exception as exc:  # the request may be finished already (ALREADY_COMPLETED is a 400)
            reason = scrub(f"{type(exc).__name__}: {exc}", *secrets_of(self._key))
            logger.info("%s: cancelling fal request %s failed: %s", self.name, handle.request_id, reason)
        else:
            logger.info("%s: cancelled fal request %s", self.name, handle.request_id)

    def _forget_cancel(self, task: asyncio.Task[None]) -> None:
        self._cancels.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved here, so a failure is not reported as never retrieved
