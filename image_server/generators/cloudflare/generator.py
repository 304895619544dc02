"""Cloudflare Workers AI image models (FLUX.1 schnell, the Stable Diffusion family) over REST.

Plain httpx against ``/accounts/{account_id}/ai/run/{model}`` (API_CONTRACTS.md section 4);
the body is built per model family (models.py, wire.py); account id and API token both come
from environment variables named in config.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, ClassVar

import httpx

from image_server.errors import (
    ContentPolicy,
    GenerationFailed,
    GeneratorError,
    GeneratorUnavailable,
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
from image_server.generators.cloudflare.config import CloudflareConfig
from image_server.generators.cloudflare.wire import build_body, read_image
from image_server.generators.http import (
    HTTPGenerator,
    error_for_status,
    json_or_none,
    parse_retry_after,
    read_api_key,
    scrub,
    translate_transport_errors,
)

ACCOUNT_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# The envelope's own codes where the HTTP status alone says too little.
AUTH_ERROR = 10000
DAILY_ALLOCATION_USED = 3036
# NSFW refusals are not in Cloudflare's error table (UNCONFIRMED); recognise them by wording.
POLICY_WORDING = re.compile(r"nsfw|unsafe|safety|inappropriate|content policy", re.IGNORECASE)
MAX_DETAIL_CHARS = 300


class CloudflareGenerator(HTTPGenerator):
    """Text-to-image (and image-to-image for the img2img model); prompt length, steps and sizes
    are bounded by the model's schema."""

    strategy: ClassVar[str] = "cloudflare"
    config_model: ClassVar[type[GeneratorConfig]] = CloudflareConfig
    config: CloudflareConfig
    # Set by open(); the base constructor checks the config and keeps ``environ``.
    _token = ""
    _account_id = ""

    @property
    def capabilities(self) -> Capabilities:
        family = self.config.model_family
        return Capabilities(
            text_to_image=family.text_to_image,
            image_to_image=family.image_to_image,
            max_reference_images=1 if family.image_to_image else 0,
            min_size=family.min_size,
            max_size=family.max_size,
            max_prompt_chars=self.config.max_prompt_chars,
            parameters=family.parameters | ({"seed"} if self.config.send_seed else set()),
        )

    def read_credentials(self) -> None:
        """Account id and token from the environment (``GeneratorUnavailable`` if unset)."""
        self._account_id, self._token = self._read_credentials()

    async def generate(self, job: RenderJob) -> GenerationResult:
        client = self.require_open()
        config, request = self.config, job.request
        try:
            ignored = check_request(self.capabilities, request, self.name)
            reference = job.references[0] if job.references else None
            if reference is None:
                run = build_body(config, request, None, ignored)
            else:  # base64 of a big reference is worth a thread
                run = await asyncio.to_thread(build_body, config, request, reference, ignored)
            with translate_transport_errors(self.name, self._token, self._account_id):
                response = await client.post(
                    f"/accounts/{self._account_id}/ai/run/{config.model}",
                    json=run.body,
                    headers={"authorization": f"Bearer {self._token}"},
                )
            if response.status_code >= 400:
                raise self._http_error(response, json_or_none(response))
            content_type = response.headers.get("content-type", "")
            data = await asyncio.to_thread(read_image, response.content, content_type, generator=self.name)
            if isinstance(data, dict):
                raise self._http_error(response, data)
            fmt = image_format_of(data)
            if fmt is None:
                raise GenerationFailed(f"{self.name}: provider returned an image that is not PNG, JPEG or WebP")
        except ImageServerError as exc:
            exc.request_id = exc.request_id or request.request_id
            exc.generator = exc.generator or self.name
            raise
        image = GeneratedImage(data=data, format=fmt, seed=run.body.get("seed"))
        return GenerationResult(images=[image], prompt=request.prompt, applied=run.applied, ignored=run.ignored)

    async def health(self) -> HealthReport:
        """Model search on the account: checks the token, the account id and the model name."""
        if self._client is None:
            try:
                self._read_credentials()
            except GeneratorError as exc:
                return HealthReport(ok=False, detail=str(exc))
            return HealthReport(ok=False, detail=f"{self.name}: generator is not open")
        model = self.config.model
        try:
            with translate_transport_errors(self.name, self._token, self._account_id):
                response = await self._client.get(
                    f"/accounts/{self._account_id}/ai/models/search",
                    params={"search": model.rsplit("/", 1)[-1]},
                    headers={"authorization": f"Bearer {self._token}"},
                )
        except GeneratorError as exc:
            return HealthReport(ok=False, detail=str(exc))
        payload = json_or_none(response)
        if response.status_code >= 400 or (isinstance(payload, dict) and payload.get("success") is False):
            return HealthReport(ok=False, detail=str(self._http_error(response, payload)))
        listed = payload.get("result") if isinstance(payload, dict) else None
        entries = listed if isinstance(listed, list) else []
        names = {entry.get("name") for entry in entries if isinstance(entry, dict)}
        if model not in names:
            return HealthReport(ok=False, detail=f"{self.name}: token accepted, but model {model} is not listed")
        return HealthReport(ok=True, detail=f"{self.name}: token accepted and model {model} is available")

    def _read_credentials(self) -> tuple[str, str]:
        account_id = read_api_key(self.config.account_id_env, generator=self.name, environ=self.environ)
        token = read_api_key(self.config.api_token_env, generator=self.name, environ=self.environ)
        if not ACCOUNT_ID_PATTERN.match(account_id.get_secret_value()):
            raise GeneratorUnavailable(
                f"{self.name}: the account id in {self.config.account_id_env} is not a Cloudflare account id",
                generator=self.name,
            )
        return account_id.get_secret_value(), token.get_secret_value()

    def _http_error(self, response: httpx.Response, payload: Any) -> GenerationFailed:
        """The v4 envelope ``{"success": false, "errors": [{code, message}]}`` -> our errors."""
        errors = payload.get("errors") if isinstance(payload, dict) else None
        entries = [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []
        codes = [e.get("code") for e in entries if isinstance(e.get("code"), int)]
        text = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in entries) or response.text
        detail = scrub(text, self._token, self._account_id)[:MAX_DETAIL_CHARS]  # scrub, then cut
        error_type = str(codes[0]) if codes else None
        # A 2xx with success false carries no useful status; treat it as a refused request.
        status = response.status_code if response.status_code >= 400 else 400
        if POLICY_WORDING.search(text):
            return ContentPolicy(
                f"{self.name}: refused by the provider's content filter: {detail}",
                status=status,
                error_type=error_type,
                generator=self.name,
            )
        if AUTH_ERROR in codes and status not in (401, 403):
            status = 401
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        error = error_for_status(status, detail, generator=self.name, retry_after=retry_after, error_type=error_type)
        if DAILY_ALLOCATION_USED in codes:  # the free allocation resets daily: retrying now cannot help
            error.retryable = False
        return error
