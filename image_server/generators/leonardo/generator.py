"""Leonardo.ai v1 over REST: upload an init image, create a generation, poll it, download.

Plain httpx (API_CONTRACTS.md section 6). The key travels in the ``authorization`` header of
calls to ``base_url`` only: the S3 presigned POST and the image CDN never see it. Leonardo has
no cancel; a generation we abandon is deleted, and so is an uploaded init image once used.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping
from contextlib import aclosing
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
from image_server.generators.http import (
    HTTPGenerator,
    download_all,
    json_or_none,
    poll_answers,
    read_api_key,
    scrub,
    translate_transport_errors,
)
from image_server.generators.leonardo.config import MAX_IMAGES, MAX_SIDE, MIN_SIDE, LeonardoConfig
from image_server.generators.leonardo.errors import error_in_body, leonardo_error
from image_server.generators.leonardo.wire import (
    EXTENSIONS,
    Polled,
    build_body,
    parse_created,
    parse_generation,
    parse_upload,
)

logger = logging.getLogger(__name__)


class LeonardoGenerator(HTTPGenerator):
    """Text-to-image and image-to-image (one init image) through one Leonardo model."""

    strategy: ClassVar[str] = "leonardo"
    config_model: ClassVar[type[GeneratorConfig]] = LeonardoConfig
    config: LeonardoConfig
    _key = ""

    def __init__(
        self, config: LeonardoConfig, *, name: str | None = None, environ: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(config, name=name, environ=environ)
        self._cleanups: set[asyncio.Task[None]] = set()  # deletes still running when a render moved on

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            image_to_image=True,
            max_reference_images=1,
            loras=self.config.elements,
            min_size=MIN_SIDE,
            max_size=MAX_SIDE,
            max_images=MAX_IMAGES,
            parameters=frozenset({"seed", "negative_prompt", "steps", "guidance_scale", "strength", "style"}),
        )

    def read_credentials(self) -> None:
        self._key = read_api_key(self.config.api_key_env, generator=self.name, environ=self.environ).get_secret_value()

    @property
    def _auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self._key}", "accept": "application/json"}

    async def generate(self, job: RenderJob) -> GenerationResult:
        client = self.require_open()
        request = job.request
        init_image_id: str | None = None
        try:
            ignored = check_request(self.capabilities, request, self.name)
            if job.references:
                job.progress(None, "uploading the init image")
                init_image_id = await self._upload_init_image(client, job.references[0])
            built = build_body(job, self.config, ignored=ignored, init_image_id=init_image_id, generator=self.name)
            generation_id = await self._create(client, built.body)
            logger.debug("%s: %s is Leonardo generation %s", self.name, request.request_id, generation_id)
            polled = await self._wait(client, generation_id, job)
            if request.delivery == "url":  # hand Leonardo's URLs on untouched
                images = [GeneratedImage(url=url, format=_format_of_url(url), seed=polled.seed) for url in polled.urls]
            else:
                blobs = await download_all(client, polled.urls, generator=self.name)
                images = [self._image(data, polled.seed) for data in blobs]
        except ImageServerError as exc:
            exc.request_id = exc.request_id or request.request_id
            exc.generator = exc.generator or self.name
            raise
        finally:
            if init_image_id is not None and self.config.delete_init_images:
                self._cleanup(client, f"/init-image/{init_image_id}")
        if polled.seed is not None:
            built.applied["seed"] = polled.seed
        if init_image_id is not None:
            built.applied["init_image"] = "uploaded"
        return GenerationResult(images=images, prompt=request.prompt, applied=built.applied, ignored=built.ignored)

    async def health(self) -> HealthReport:
        """``GET /me``: free, authenticated, and names the account."""
        if self._client is None:
            try:
                self.read_credentials()
            except GeneratorError as exc:
                return HealthReport(ok=False, detail=str(exc))
            return HealthReport(ok=False, detail=f"{self.name}: generator is not open")
        try:
            payload = await self._call(self._client, "GET", "/me", "checking the key")
        except GeneratorError as exc:
            return HealthReport(ok=False, detail=str(exc))
        details = payload.get("user_details") if isinstance(payload, dict) else None
        if not isinstance(details, list) or not details:
            return HealthReport(ok=False, detail=f"{self.name}: /me answered without user_details")
        return HealthReport(ok=True, detail=f"{self.name}: key accepted by Leonardo (GET /me)")

    async def aclose(self) -> None:
        """Let pending deletes finish (each is bounded by cleanup_timeout_s), then close the client."""
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
        await super().aclose()

    async def _call(self, client: httpx.AsyncClient, method: str, path: str, what: str, **kwargs: Any) -> Any:
        """One authenticated JSON call; errors (also those in a 2xx body) become ours."""
        with translate_transport_errors(self.name, self._key):
            response = await client.request(method, path, headers=self._auth, **kwargs)
        payload = json_or_none(response)
        if response.status_code >= 400 or error_in_body(payload):
            raise leonardo_error(response, generator=self.name, key=self._key, what=what)
        return payload

    async def _upload_init_image(self, client: httpx.AsyncClient, reference: ReferenceImage) -> str:
        """``POST /init-image`` for a presigned S3 POST, then the POST itself: its form fields
        exactly as returned, the file part last (S3 ignores fields after it)."""
        extension = EXTENSIONS[reference.format]
        payload = await self._call(
            client, "POST", "/init-image", "asking for an init image upload", json={"extension": extension}
        )
        image_id, url, fields = parse_upload(payload, generator=self.name)
        files = {"file": (f"init.{extension}", reference.data, reference.mime)}
        with translate_transport_errors(self.name, self._key):
            response = await client.post(url, data=fields, files=files)  # no key: S3 is another host
        if response.status_code >= 300:
            raise leonardo_error(response, generator=self.name, key=self._key, what="uploading the init image")
        return image_id

    async def _create(self, client: httpx.AsyncClient, body: dict[str, Any]) -> str:
        """``POST /generations``. A cancel that lands mid-call still waits (in the background,
        bounded) for the generation id and deletes it: nobody wants it, and it is paid for."""
        call = asyncio.ensure_future(self._call(client, "POST", "/generations", "creating the generation", json=body))
        try:
            payload = await asyncio.shield(call)
        except asyncio.CancelledError:
            if self.config.delete_cancelled:
                self._detach(self._delete_once_created(client, call))
            else:
                call.cancel()
            raise
        return parse_created(payload, generator=self.name)

    async def _delete_once_created(self, client: httpx.AsyncClient, call: asyncio.Future[Any]) -> None:
        try:
            async with asyncio.timeout(self.config.cleanup_timeout_s):
                payload = await call
            generation_id = parse_created(payload, generator=self.name)
        except (GeneratorError, TimeoutError) as exc:  # failed or too slow: nothing we can delete
            logger.info("%s: a cancelled create left nothing to delete: %s", self.name, scrub(str(exc), self._key))
            return
        await self._delete(client, f"/generations/{generation_id}")

    async def _wait(self, client: httpx.AsyncClient, generation_id: str, job: RenderJob) -> Polled:
        """Poll with growing delays until COMPLETE or FAILED; a cancel deletes the generation."""
        config = self.config
        path = f"/generations/{generation_id}"
        polls = 0
        answers = poll_answers(
            lambda: self._call(client, "GET", path, "polling the generation"),
            first=config.poll_interval_s,
            factor=config.poll_backoff,
            cap=config.poll_max_interval_s,
            tolerated=config.poll_failures_tolerated,
            what=f"{self.name}: generation {generation_id}",
        )
        try:
            async with aclosing(answers):
                async for payload in answers:
                    polled = parse_generation(payload, generator=self.name, refuse_nsfw=config.refuse_nsfw)
                    if polled.status == "COMPLETE":
                        return polled
                    if polled.status == "FAILED":
                        raise GenerationFailed(
                            f"{self.name}: Leonardo reports the generation FAILED",
                            error_type="FAILED",
                            generator=self.name,
                        )
                    if polls == 0:  # once: every poll says the same, and the service shows elapsed time
                        job.progress(None, "pending at Leonardo")
                    polls += 1
            raise AssertionError("poll_answers ends only by raising")  # for the type checker
        except asyncio.CancelledError:
            if config.delete_cancelled:
                self._cleanup(client, path)
            raise

    def _cleanup(self, client: httpx.AsyncClient, path: str) -> None:
        """A best-effort DELETE that outlives the render (it may be cancelled), bounded in time."""
        self._detach(self._delete(client, path))

    def _detach(self, cleanup: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(cleanup)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _delete(self, client: httpx.AsyncClient, path: str) -> None:
        try:
            async with asyncio.timeout(self.config.cleanup_timeout_s):
                await self._call(client, "DELETE", path, f"deleting {path}")
        except (GeneratorError, TimeoutError, RuntimeError) as exc:
            logger.info("%s: could not delete %s: %s", self.name, path, scrub(str(exc), self._key))

    def _image(self, data: bytes, seed: int | None) -> GeneratedImage:
        fmt = image_format_of(data)
        if fmt is None:
            raise GenerationFailed(f"{self.name}: a result image is not PNG, JPEG or WebP", generator=self.name)
        return GeneratedImage(data=data, format=fmt, seed=seed)


def _format_of_url(url: str) -> str | None:
    suffix = url.rsplit("?", 1)[0].rsplit(".", 1)[-1].lower()
    return {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp"}.get(suffix)
