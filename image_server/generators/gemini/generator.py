"""Google Gemini image generation (``gemini-2.5-flash-image``) through ``generateContent``.

Plain httpx against the REST API (API_CONTRACTS.md section 3); the key travels in the
``x-goog-api-key`` header, never in the URL.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

import httpx

from image_server.errors import GenerationFailed, GeneratorError, ImageServerError
from image_server.generators.base import (
    Capabilities,
    GeneratedImage,
    GenerationResult,
    GeneratorConfig,
    HealthReport,
    RenderJob,
    check_request,
)
from image_server.generators.gemini.config import GeminiConfig, nearest_aspect_ratio
from image_server.generators.gemini.wire import (
    MAX_DETAIL_CHARS,
    as_dict,
    build_request_body,
    read_images,
    retry_delay_of,
)
from image_server.generators.http import (
    HTTPGenerator,
    error_for_status,
    parse_retry_after,
    read_api_key,
    scrub,
    translate_transport_errors,
)

logger = logging.getLogger(__name__)


class GeminiGenerator(HTTPGenerator):
    """Text-to-image and prompt-guided editing with up to ``max_reference_images`` inputs."""

    strategy: ClassVar[str] = "gemini"
    config_model: ClassVar[type[GeneratorConfig]] = GeminiConfig
    config: GeminiConfig
    # Set by open(); the base constructor checks the config and keeps ``environ``.
    _key = ""

    @property
    def capabilities(self) -> Capabilities:
        # No seed, negative prompt, steps, guidance, strength or style controls exist.
        return Capabilities(
            image_to_image=self.config.max_reference_images > 0,
            max_reference_images=self.config.max_reference_images,
            parameters=frozenset(),
        )

    def read_credentials(self) -> None:
        """The key from the environment (``GeneratorUnavailable`` if unset)."""
        self._key = read_api_key(self.config.api_key_env, generator=self.name, environ=self.environ).get_secret_value()

    async def generate(self, job: RenderJob) -> GenerationResult:
        client = self.require_open()
        config, request = self.config, job.request
        try:
            ignored = check_request(self.capabilities, request, self.name)
            aspect_ratio: str | None = config.aspect_ratio
            if aspect_ratio is None and (request.width or request.height):
                aspect_ratio = nearest_aspect_ratio(job.width, job.height)
            body = await asyncio.to_thread(
                build_request_body, request.prompt, job.references, config=config, aspect_ratio=aspect_ratio
            )
            with translate_transport_errors(self.name, self._key):
                response = await client.post(
                    f"/{config.api_version}/models/{config.model}:generateContent",
                    content=body,
                    headers={"x-goog-api-key": self._key, "content-type": "application/json"},
                )
            if response.status_code != 200:
                raise self._http_error(response)
            images, texts = await asyncio.to_thread(read_images, response.content, generator=self.name)
        except ImageServerError as exc:
            exc.request_id = exc.request_id or request.request_id
            exc.generator = exc.generator or self.name
            raise
        if texts:
            logger.debug("%s: %s also answered with text: %.200s", request.request_id, self.name, " ".join(texts))
        generated = [GeneratedImage(data=data, format=fmt) for data, fmt in images[: request.num_images]]
        applied: dict[str, Any] = {"model": config.model, "aspect_ratio": aspect_ratio or "model default"}
        if config.image_size is not None:
            applied["image_size"] = config.image_size
        if job.references:
            applied["reference_images"] = len(job.references)
        return GenerationResult(images=generated, prompt=request.prompt, applied=applied, ignored=ignored)

    async def health(self) -> HealthReport:
        """``GET models/{model}``: checks reachability, the key and that the model exists."""
        if self._client is None:
            try:
                read_api_key(self.config.api_key_env, generator=self.name, environ=self.environ)
            except GeneratorError as exc:
                return HealthReport(ok=False, detail=str(exc))
            return HealthReport(ok=False, detail=f"{self.name}: generator is not open")
        try:
            with translate_transport_errors(self.name, self._key):
                response = await self._client.get(
                    f"/{self.config.api_version}/models/{self.config.model}",
                    headers={"x-goog-api-key": self._key},
                )
        except GeneratorError as exc:
            return HealthReport(ok=False, detail=str(exc))
        if response.status_code != 200:
            return HealthReport(ok=False, detail=str(self._http_error(response)))
        return HealthReport(ok=True, detail=f"{self.name}: model {self.config.model} is available")

    def _http_error(self, response: httpx.Response) -> GenerationFailed:
        """Google's ``{"error": {code, message, status, details}}`` envelope -> our errors."""
        try:
            error = as_dict(as_dict(response.json()).get("error"))
        except ValueError:
            error = {}
        status_name = error.get("status") if isinstance(error.get("status"), str) else None
        raw_details = error.get("details")
        details: list[Any] = raw_details if isinstance(raw_details, list) else []
        # Scrubbed before it is cut: a key straddling the cut would otherwise leave half of it.
        message = scrub(str(error.get("message") or response.text or ""), self._key)[:MAX_DETAIL_CHARS]
        detail = scrub(f"{status_name}: {message}" if status_name else message, self._key)
        retry_after = parse_retry_after(response.headers.get("retry-after")) or retry_delay_of(details)
        reasons = {as_dict(d).get("reason") for d in details}
        if "API_KEY_INVALID" in reasons:  # Google answers a bad key with 400, not 401
            return GenerationFailed(
                f"{self.name}: authentication failed (HTTP {response.status_code} API_KEY_INVALID): {detail}",
                status=response.status_code,
                error_type="API_KEY_INVALID",
                generator=self.name,
                retryable=False,
            )
        return error_for_status(
            response.status_code, detail, generator=self.name, retry_after=retry_after, error_type=status_name
        )
