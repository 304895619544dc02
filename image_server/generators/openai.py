"""OpenAI Images strategy (gpt-image-*, dall-e-3) over plain httpx: generations as JSON, edits as multipart.

The wire contract is providers/API_CONTRACTS.md section 2; provider errors are translated here.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
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
    decode_base64_image,
    download,
    error_for_status,
    parse_retry_after,
    read_api_key,
    scrub,
    translate_transport_errors,
)
from image_server.generators.http_generator import HTTPGenerator
from image_server.generators.openai_config import DALLE3_STYLES, MODELS, OpenAIConfig, nearest_size, size_dims

__all__ = ["OpenAIConfig", "OpenAIGenerator"]

CONTENT_POLICY_CODES = frozenset({"moderation_blocked", "content_policy_violation"})
MAX_RESULT_PIXELS = 64 * 1024 * 1024  # far above any size OpenAI makes; a header claiming more is hostile


@dataclass
class _Item:
    """One entry of a response's ``data``: decoded bytes, or a URL to fetch or pass on."""

    data: bytes | None = None
    url: str | None = None
    revised_prompt: str | None = None


def _parse_payload(body: bytes, generator: str) -> list[_Item]:
    """Blocking (JSON with base64 images can be tens of MiB): run in a thread."""
    try:
        payload = json.loads(body)
        items = payload["data"]
        if not isinstance(items, list) or not items:
            raise ValueError("'data' is empty")
        parsed: list[_Item] = []
        for entry in items:
            b64, url, revised = entry.get("b64_json"), entry.get("url"), entry.get("revised_prompt")
            revised = revised if isinstance(revised, str) else None
            if isinstance(b64, str) and b64:
                parsed.append(_Item(data=decode_base64_image(b64, generator=generator), revised_prompt=revised))
            elif isinstance(url, str) and url.startswith(("https://", "http://", "data:")):
                parsed.append(_Item(url=url, revised_prompt=revised))
            else:
                raise ValueError("an image has neither b64_json nor url")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise GenerationFailed(f"{generator}: malformed response from OpenAI: {exc}", generator=generator) from exc
    return parsed


def _inspect(data: bytes, generator: str) -> GeneratedImage:
    """Format and size from the header only (blocking: run in a thread)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (width, height) = (img.format or "").lower(), img.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise GenerationFailed(f"{generator}: OpenAI returned data that is not an image", generator=generator) from exc
    if fmt not in ("png", "jpeg", "webp") or width * height > MAX_RESULT_PIXELS:
        message = f"{generator}: OpenAI returned an unusable image ({fmt or 'unknown format'} {width}x{height})"
        raise GenerationFailed(message, generator=generator)
    return GeneratedImage(data=data, format=fmt, width=width, height=height)


def _retry_after(headers: httpx.Headers) -> float | None:
    """``retry-after-ms`` (OpenAI's precise form) first, then ``Retry-After``."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    return parse_retry_after(headers.get("retry-after"))


def _error_fields(response: httpx.Response, key: str) -> tuple[str, str | None, str | None]:
    """(message, type, code) from ``{"error": {...}}``, or the start of a non-JSON body (scrubbed
    before it is cut: a key straddling the cut would otherwise leave half of it)."""
    try:
        error = response.json().get("error")
        message = error.get("message") or ""
        kind, code = error.get("type"), error.get("code")
        return str(message), kind if isinstance(kind, str) else None, code if isinstance(code, str) else None
    except (ValueError, AttributeError):
        return scrub(response.text, key)[:300].strip(), None, None


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
        spec = MODELS[self.config.model]
        return Capabilities(
            image_to_image=spec.max_references > 0,
            max_reference_images=spec.max_references,
            max_images=spec.max_images,
            max_prompt_chars=spec.max_prompt_chars,
            # No seed, negative prompt, steps, guidance or strength exist; dall-e-3 has vivid/natural styles.
            parameters=frozenset() if spec.gpt_image else frozenset({"style"}),
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
        items = await asyncio.to_thread(_parse_payload, response.content, self.name)
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
        if MODELS[config.model].gpt_image:
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
            style = request.style if request.style in DALLE3_STYLES else config.style
            if request.style is not None and request.style not in DALLE3_STYLES:
                ignored.append("style")
            if style is not None:
                params["style"] = style
            # A dall-e URL expires in an hour: pass it on only when the client asked for URLs.
            params["response_format"] = "url" if request.delivery == "url" else "b64_json"
        if config.user is not None:
            params["user"] = config.user
        return params, ignored

    async def _image(self, client: httpx.AsyncClient, item: _Item, params: Mapping[str, Any]) -> GeneratedImage:
        if item.data is not None:
            return await asyncio.to_thread(_inspect, item.data, self.name)
        assert item.url is not None  # _parse_payload guarantees one of the two
        if params.get("response_format") == "url":
            width, height = size_dims(params["size"])
            return GeneratedImage(url=item.url, format="png", width=width, height=height)
        data = await download(client, item.url, generator=self.name)
        return await asyncio.to_thread(_inspect, data, self.name)

    def _error(self, response: httpx.Response, key: str) -> GenerationFailed:
        """Translate an error response (contract 2.4); the key is scrubbed from every message."""
        status = response.status_code
        message, kind, code = _error_fields(response, key)
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
            status, detail, generator=self.name, retry_after=_retry_after(response.headers), error_type=label
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
