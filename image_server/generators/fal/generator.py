"""fal.ai strategy: one configured endpoint, driven through fal-client's queue (submit, poll, result).

fal_client is imported in ``open()`` only, so configuring other strategies never needs it.
The wire contract is providers/API_CONTRACTS.md section 1; helpers live in ``fal_*`` modules.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

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
from image_server.generators.fal.wire import build_arguments, fetch_images, parse_output
from image_server.generators.http import read_api_key, scrub

if TYPE_CHECKING:
    import fal_client

__all__ = ["KNOWN_ENDPOINTS", "EndpointSpec", "FalConfig", "FalGenerator"]

logger = logging.getLogger(__name__)
INSTALL_HINT = "install the 'fal' extra: uv sync --extra fal (or pip install 'image-server[fal]')"


def _import_fal_client() -> Any:
    try:
        import fal_client
    except ImportError as exc:
        raise GeneratorUnavailable(f"the fal strategy needs fal-client; {INSTALL_HINT}") from exc
    return fal_client


def status_message(status: fal_client.Status) -> str:
    """A progress line for a fal queue status (call after ``open()``: fal_client is imported then)."""
    import fal_client

    if isinstance(status, fal_client.Queued):
        return f"queued at position {status.position}"
    if isinstance(status, fal_client.InProgress):
        return "generating"
    return "completed" if isinstance(status, fal_client.Completed) else type(status).__name__.lower()


class FalGenerator(Generator):
    """Renders through one fal endpoint; see ``FalConfig`` for the knobs."""

    strategy: ClassVar[str] = "fal"
    config_model: ClassVar[type[FalConfig]] = FalConfig
    config: FalConfig

    # Set by open(); the base constructor checks the config and keeps ``environ``.
    _key = ""
    _client: fal_client.AsyncClient | None = None
    _http: httpx.AsyncClient | None = None

    def __init__(self, config: FalConfig, *, name: str | None = None, environ: Mapping[str, str] | None = None) -> None:
        super().__init__(config, name=name, environ=environ)
        # Remote cancels still running when the request task has moved on; closed in aclose().
        self._cancels: set[asyncio.Task[None]] = set()

    @property
    def capabilities(self) -> Capabilities:
        return self.config.spec.capabilities()

    async def open(self) -> None:
        """Import fal_client, read the key from ``api_key_env`` and create the clients."""
        if self._client is not None:
            return
        fal = _import_fal_client()
        self._key = read_api_key(self.config.api_key_env, generator=self.name, environ=self.environ).get_secret_value()
        self._client = fal.AsyncClient(key=self._key, default_timeout=self.config.request_timeout_s)
        self._http = httpx.AsyncClient(timeout=self.config.download_timeout_s, follow_redirects=True)

    async def generate(self, job: RenderJob) -> GenerationResult:
        """Render one job. Raises ``Unsupported``, ``ContentPolicy``, ``RateLimited``,
        ``GenerationFailed`` or ``GenerationTimeout``; a cancellation also cancels the fal request."""
        client, http = self._require_open()
        request = job.request
        config = self.config
        ignored = check_request(config.spec.capabilities(), request, self.name)
        rid = request.request_id
        image_url = upload_mode = None
        if job.references:
            with translate_fal_errors(self.name, self._key, request_id=rid):
                image_url, upload_mode = await self._reference_url(client, config, job.references[0])
        built = build_arguments(config, request, image_url=image_url, ignored=ignored)
        if upload_mode is not None:
            built.applied["reference_upload"] = upload_mode
        with translate_fal_errors(self.name, self._key, request_id=rid):
            output = await self._run_queue(client, config, built.arguments, job)
        parsed = parse_output(output, generator=self.name, request_id=rid)
        with translate_fal_errors(self.name, self._key, request_id=rid):
            images = await fetch_images(
                http,
                parsed,
                pass_urls=request.delivery == "url",
                requested_format=built.output_format,
                generator=self.name,
            )
        if parsed.seed is not None:
            built.applied["seed"] = parsed.seed
        return GenerationResult(
            images=images, prompt=parsed.prompt or request.prompt, applied=built.applied, ignored=built.ignored
        )

    async def health(self) -> HealthReport:
        """fal has no authenticated no-op. ``storage_token`` asks fal's storage for an upload token
        (free, authenticated, no side effect beyond the token); ``key`` only checks the key is set."""
        env = self.config.api_key_env
        if not self.environ.get(env, "").strip():
            return HealthReport(ok=False, detail=f"no API key in the environment variable {env}")
        if self.config.health_check == "key":
            return HealthReport(
                ok=True, detail=f"API key present in {env}; not verified (fal.ai has no authenticated no-op)"
            )
        key = self.environ[env].strip()
        try:
            fal = _import_fal_client()
        except GeneratorUnavailable as exc:
            return HealthReport(ok=False, detail=str(exc))
        url = f"{fal.client.REST_URL}/storage/auth/token?storage_type=fal-cdn-v3"
        try:
            async with httpx.AsyncClient(timeout=self.config.request_timeout_s) as http:
                response = await http.post(url, json={}, headers={"Authorization": f"Key {key}"})
        except httpx.HTTPError as exc:
            detail = scrub(f"could not reach fal: {type(exc).__name__}: {exc}", *secrets_of(key))
            return HealthReport(ok=False, detail=detail)
        if response.is_success:
            return HealthReport(
                ok=True, detail="key accepted by fal (storage token); the endpoint itself is not checked"
            )
        if response.status_code in (401, 403):
            return HealthReport(ok=False, detail=f"fal rejected the key in {env} (HTTP {response.status_code})")
        return HealthReport(ok=False, detail=f"fal storage token check failed (HTTP {response.status_code})")

    async def aclose(self) -> None:
        """Stop pending remote cancels, close fal-client's HTTP client and the download client."""
        for task in list(self._cancels):
            task.cancel()
        if self._cancels:
            await asyncio.gather(*self._cancels, return_exceptions=True)
        client, http = self._client, self._http
        self._client = self._http = None
        if client is not None:
            # AsyncClient has no aclose(); its httpx client is an async cached property that
            # lands in __dict__ once used (asyncstdlib's AwaitableValue, with .value).
            inner = getattr(client.__dict__.get("_client"), "value", None)
            if isinstance(inner, httpx.AsyncClient):
                await inner.aclose()
        if http is not None:
            await http.aclose()

    def _require_open(self) -> tuple[fal_client.AsyncClient, httpx.AsyncClient]:
        if self._client is None or self._http is None:
            raise RuntimeError(f"generator {self.name!r} is not open; use 'async with generator:'")
        return self._client, self._http

    async def _reference_url(
        self, client: fal_client.AsyncClient, config: FalConfig, reference: ReferenceImage
    ) -> tuple[str, str]:
        """A data URI for small images (no extra round trip), a fal storage URL for big ones."""
        mode = config.upload
        if mode == "auto":
            mode = "storage" if len(reference.data) > config.upload_threshold_bytes else "data_uri"
        if mode == "storage":
            url: str = await client.upload(reference.data, reference.mime, file_name=f"reference.{reference.format}")
            return url, mode
        fal = _import_fal_client()
        return await asyncio.to_thread(fal.encode, reference.data, reference.mime), mode

    async def _run_queue(
        self, client: fal_client.AsyncClient, config: FalConfig, arguments: dict[str, Any], job: RenderJob
    ) -> Any:
        """Submit, report status changes as progress, fetch the result; cancel remotely if cancelled."""
        handle = await self._submit(client, config, arguments)
        logger.debug("%s: submitted %s as fal request %s", self.name, config.endpoint, handle.request_id)
        try:
            last = None
            async for status in handle.iter_events(with_logs=False, interval=config.poll_interval_s):
                message = status_message(status)
                if message != last:
                    job.progress(1.0 if message == "completed" else None, message)
                    last = message
            # get() polls once more (fal answers COMPLETED idempotently) and then fetches the result.
            return await handle.get(interval=config.poll_interval_s)
        except asyncio.CancelledError:
            await self._cancel_remote(handle, config.cancel_timeout_s)
            raise

    async def _submit(
        self, client: fal_client.AsyncClient, config: FalConfig, arguments: dict[str, Any]
    ) -> fal_client.AsyncRequestHandle:
        """Submit. A cancellation that lands mid-submit still waits (bounded) for the request id
        and cancels the request, so no render nobody wants keeps running (and costing) at fal."""
        # X-Fal-Request-Timeout makes fal drop the request if it is still queued when we give up;
        # fal-client refuses values of 1 s or less.
        start_timeout = config.timeout_s if config.timeout_s > 1 else None
        submit = asyncio.ensure_future(client.submit(config.endpoint, arguments, start_timeout=start_timeout))
        try:
            return await asyncio.shield(submit)
        except asyncio.CancelledError:
            try:
                handle = await asyncio.wait_for(submit, config.cancel_timeout_s)
            except Exception:  # a failed or slow submit: there is nothing to cancel
                pass
            else:
                await self._cancel_remote(handle, config.cancel_timeout_s)
            raise

    async def _cancel_remote(self, handle: fal_client.AsyncRequestHandle, timeout: float) -> None:
        """Best effort PUT cancel_url, shielded from a second cancellation and bounded by ``timeout``."""
        task = asyncio.ensure_future(handle.cancel())
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
