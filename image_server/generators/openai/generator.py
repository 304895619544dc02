"""OpenAI Images strategy (gpt-image-*, dall-e-3) over plain httpx: generations as JSON, edits as multipart.

The wire contract is providers/API_CONTRACTS.md section 2; provider errors are translated here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, ClassVar

import httpx
from pydantic import SecretStr

from image_server.errors import ContentPolicy, GenerationFailed, GeneratorError, GeneratorUnavailable
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
    read_api_key,
    scrub,
    translate_transport_errors,
)
from image_server.generators.openai.config import OpenAIConfig, nearest_size, size_dims
from image_server.generators.openai.wire import ResultItem, error_fields, inspect_image, parse_payload, retry_after_of

__all__ = ["OpenAIConfig", "OpenAIGenerator"]

CONTENT_POLICY_CODES = frozenset({"moderation_blocked", "content_policy_violation"})


class OpenAIGenerator(HTTPGenerator):
    """OpenAI Images: text-to-image on ``/images/generations``, reference images on ``/images/edits``."""

    strategy: ClassVar[str] = "openai"
    config_model: ClassVar[type[GeneratorConfig]] = OpenAIConfig
    config: OpenAIConfig
    # Set by open(); the base constructor checks the config and keeps ``environ``.
    _key: SecretStr | None = None
    _extra_headers: Mapping[str, str] = {}

    @property
    def capabilities(self) -> Capabilities:
        spec = self.config.spec
        return Capabilities(
            image_to_image=spec.max_references > 0,
            max_reference_images=spec.max_references,
            max_images=spec.max_images,
            max_prompt_chars=spec.max_prompt_chars,
            # No seed, negative prompt, steps, guidance or strength exist; dall-e-3 has vivid/natural styles.
            parameters=frozenset({"style"}) if spec.styles else frozenset(),
        )

    def read_credentials(self) -> None:
        """The key, and the optional organization / project ids, from the environment."""
        self._key = read_api_key(self.config.api_key_env, generator=self.name, environ=self.environ)
        extra_headers: dict[str, str] = {}
        for header, env_var in (
            ("OpenAI-Organization", self.config.organization_env),
            ("OpenAI-Project", self.config.project_env),
        ):
            if env_var:
                value = self.environ.get(env_var, "").strip()
                if not value:
                    raise GeneratorUnavailable(
                        f"generator {self.name!r} names {env_var} for its {header} header, but it is not set",
                        generator=self.name,
                    )
                extra_headers[header] = value
        self._extra_headers = extra_headers

    def _opened(self) -> tuple[httpx.AsyncClient, str]:
        if self._client is None or self._key is None:
            raise RuntimeError(f"generator {self.name!r} is not open; use 'async with' or call open() first")
        return self._client, self._key.get_secret_value()

    def _headers(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}", **self._extra_headers}

    async def generate(self, job: RenderJob) -> GenerationResult:
        """One call to generations (no references) or edits; raises ``image_server.errors`` only."""
        client, key = self._opened()
        request = job.request
        check_request(self.capabilities, request, self.name)
        size, applied = self._size(job)
        params, ignored = self._parameters(job, size, edit=bool(job.references))
        applied.update({k: v for k, v in params.items() if k not in ("prompt", "n", "response_format", "user")})
        job.progress(None, f"waiting for {self.config.model}")
        with translate_transport_errors(self.name, key):
            if job.references:
                fields = {k: str(v) for k, v in params.items()}
                field = "image" if len(job.references) == 1 else "image[]"
                files = [
                    (field, (f"reference-{i}.{ref.format.replace('jpeg', 'jpg')}", ref.data, ref.mime))
                    for i, ref in enumerate(job.references)
                ]
                response = await client.post("/images/edits", data=fields, files=files, headers=self._headers(key))
            else:
                response = await client.post("/images/generations", json=params, headers=self._headers(key))
        if response.status_code >= 400:
            raise self._error(response, key)
        items = await asyncio.to_thread(parse_payload, response.content, self.name)
        images = [await self._image(client, item, params) for item in items]
        revised = next((item.revised_prompt for item in items if item.revised_prompt), None)
        if revised:
            applied["revised_prompt"] = revised
        return GenerationResult(images=images, prompt=request.prompt, applied=applied, ignored=ignored)

    def _size(self, job: RenderJob) -> tuple[str, dict[str, Any]]:
        """The size to ask for, and the width/height changes the request has to accept."""
        request = job.request
        if request.width is None and request.height is None:
            if self.config.size is not None:
                return self.config.size, {}
            source = job.references[0] if job.references else None
            width, height = (source.width, source.height) if source else (1024, 1024)
        else:
            width, height = job.width, job.height
        size = nearest_size(self.config.model, width, height)
        used_width, used_height = size_dims(size)
        adjusted: dict[str, Any] = {}
        if request.width is not None and request.width != used_width:
            adjusted["width"] = used_width
        if request.height is not None and request.height != used_height:
            adjusted["height"] = used_height
        return size, adjusted

    def _parameters(self, job: RenderJob, size: str, *, edit: bool) -> tuple[dict[str, Any], list[str]]:
        """The request body fields (contract 2.1/2.2) and the request fields that could not be honoured."""
        config, request = self.config, job.request
        params: dict[str, Any] = {
            "model": config.model,
            "prompt": request.prompt,
            "n": request.num_images,
            "size": size,
        }
        ignored: list[str] = []
        if config.quality is not None:
            params["quality"] = config.quality
        spec = config.spec
        if spec.gpt_image:
            # GPT image models always answer in base64 and refuse response_format.
            fmt = config.output_format or request.output_format
            if config.background == "transparent" and fmt == "jpeg":
                fmt = "png"  # JPEG has no alpha channel; the service converts afterwards
            params["output_format"] = fmt
            if config.output_compression is not None and fmt != "png":
                params["output_compression"] = config.output_compression
            if config.background is not None:
                params["background"] = config.background
            if config.moderation is not None and not edit:
                params["moderation"] = config.moderation
            if config.input_fidelity is not None and edit:
                params["input_fidelity"] = config.input_fidelity
        else:
            style = request.style if request.style in spec.styles else config.style
            if request.style is not None and request.style not in spec.styles:
                ignored.append("style")
            if style is not None:
                params["style"] = style
            # A dall-e URL expires in an hour: pass it on only when the client asked for URLs.
            params["response_format"] = "url" if request.delivery == "url" else "b64_json"
        if config.user is not None:
            params["user"] = config.user
        return params, ignored

    async def _image(self, client: httpx.AsyncClient, item: ResultItem, params: Mapping[str, Any]) -> GeneratedImage:
        if item.data is not None:
            return await asyncio.to_thread(inspect_image, item.data, self.name)
        assert item.url is not None  # parse_payload guarantees one of the two
        if params.get("response_format") == "url":
            width, height = size_dims(params["size"])
            return GeneratedImage(url=item.url, format="png", width=width, height=height)
        data = await download(client, item.url, generator=self.name)
        return await asyncio.to_thread(inspect_image, data, self.name)

    def _error(self, response: httpx.Response, key: str) -> GenerationFailed:
        """Translate an error response (contract 2.4); the key is scrubbed from every message."""
        status = response.status_code
        message, kind, code = error_fields(response, key)
        label = code or kind
        detail = scrub(message, key)[:500] + (f" [{label}]" if label else "")  # scrub, then cut
        if response.headers.get("x-request-id"):
            detail += f" (x-request-id {response.headers['x-request-id']})"
        detail = scrub(detail, key)
        is_policy = code in CONTENT_POLICY_CODES or (code is None and "safety system" in message)
        if is_policy and 400 <= status < 500 and status != 429:
            text = f"{self.name}: OpenAI's safety system refused the request: {detail}"
            return ContentPolicy(text, status=status, error_type=label, generator=self.name)
        if status == 429 and code == "insufficient_quota":
            text = f"{self.name}: OpenAI quota or billing limit reached (HTTP 429): {detail}"
            return GenerationFailed(text, status=status, error_type=code, generator=self.name, retryable=False)
        error = error_for_status(
            status, detail, generator=self.name, retry_after=retry_after_of(response.headers), error_type=label
        )
        if status == 409:
            error.retryable = True  # the official SDK retries 409 (lock timeouts) too
        should_retry = response.headers.get("x-should-retry")
        if should_retry in ("true", "false"):
            error.retryable = should_retry == "true"
        return error

    async def health(self) -> HealthReport:
        """``GET /models/{model}``: an authenticated call that costs nothing. Never raises."""
        if self._client is None or self._key is None:
            return HealthReport(ok=False, detail=f"generator {self.name!r} is not open")
        client, key = self._client, self._key.get_secret_value()
        try:
            with translate_transport_errors(self.name, key):
                response = await client.get(f"/models/{self.config.model}", headers=self._headers(key))
        except GeneratorError as exc:
            return HealthReport(ok=False, detail=str(exc))
        if response.status_code >= 400:
            return HealthReport(ok=False, detail=str(self._error(response, key)))
        return HealthReport(ok=True, detail=f"{self.config.model} is available at {self.config.base_url}")
