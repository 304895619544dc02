"""Google Gemini image generation (``gemini-2.5-flash-image``) through ``generateContent``.

Plain httpx against the REST API (API_CONTRACTS.md section 3); the key travels in the
``x-goog-api-key`` header, never in the URL.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
from collections.abc import Sequence
from functools import partial
from typing import Any, ClassVar, Literal, get_args

import httpx
from pydantic import Field

from image_server.errors import ContentPolicy, GenerationFailed, GeneratorError, ImageServerError
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
    decode_base64_image,
    error_for_status,
    image_format_of,
    parse_retry_after,
    read_api_key,
    scrub,
    translate_transport_errors,
)
from image_server.generators.http_generator import HTTPGenerator

logger = logging.getLogger(__name__)

AspectRatio = Literal["1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"]
ASPECT_RATIOS: tuple[str, ...] = get_args(AspectRatio)
# A 200 with no image and one of these finish reasons is a safety/recitation refusal, not a failure.
POLICY_FINISH_REASONS = frozenset(
    "SAFETY IMAGE_SAFETY PROHIBITED_CONTENT IMAGE_PROHIBITED_CONTENT BLOCKLIST SPII RECITATION IMAGE_RECITATION".split()
)
MAX_DETAIL_CHARS = 300


class GeminiConfig(GeneratorConfig):
    """``[generators.<name>]`` with ``strategy = "gemini"``."""

    # Model knobs only; the manager builds an instance with them applied. The model itself is
    # not overridable: pick another model (and its cost) by configuring another generator name.
    OVERRIDABLE: ClassVar[frozenset[str]] = frozenset({"aspect_ratio", "image_size"})

    strategy: Literal["gemini"] = "gemini"
    model: str = Field(default="gemini-2.5-flash-image", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    api_key_env: str = "GEMINI_API_KEY"
    base_url: str = Field(default="https://generativelanguage.googleapis.com", pattern=r"^https?://")
    api_version: str = Field(default="v1beta", pattern=r"^v[0-9a-z]+$")
    # None: derived from the request's width/height (nearest ratio), or the model's default.
    aspect_ratio: AspectRatio | None = None
    # 1K/2K/4K exist for the 3.x image models only; 2.5-flash-image is 1K.
    image_size: Literal["1K", "2K", "4K"] | None = None
    # Ask for responseModalities ["IMAGE"] instead of ["TEXT", "IMAGE"] (no text parts back).
    image_only: bool = False
    # Google: best results with <= 3 inputs on 2.5-flash-image, up to 14 on 3-pro-image.
    max_reference_images: int = Field(default=3, ge=0, le=14)
    request_timeout_s: float | None = Field(default=None, gt=0, le=3600)


def nearest_aspect_ratio(width: int, height: int) -> str:
    """The supported aspect ratio closest to ``width:height`` (compared on a log scale)."""
    target = math.log(width / height)

    def distance(ratio: str) -> float:
        w, _, h = ratio.partition(":")
        return abs(math.log(int(w) / int(h)) - target)

    return min(ASPECT_RATIOS, key=distance)


def build_request_body(
    prompt: str, references: Sequence[ReferenceImage], *, config: GeminiConfig, aspect_ratio: str | None
) -> bytes:
    """The ``generateContent`` JSON body (blocking: base64 of the references)."""
    parts: list[dict[str, Any]] = [{"text": prompt}]
    for ref in references:
        parts.append({"inlineData": {"mimeType": ref.mime, "data": base64.b64encode(ref.data).decode("ascii")}})
    generation_config: dict[str, Any] = {"responseModalities": ["IMAGE"] if config.image_only else ["TEXT", "IMAGE"]}
    image_config = {"aspectRatio": aspect_ratio, "imageSize": config.image_size}
    image_config = {key: value for key, value in image_config.items() if value is not None}
    if image_config:
        generation_config["imageConfig"] = image_config
    body = {"contents": [{"role": "user", "parts": parts}], "generationConfig": generation_config}
    return json.dumps(body).encode()


def read_images(content: bytes, *, generator: str) -> tuple[list[tuple[bytes, str]], list[str]]:
    """(bytes, format) of each image and the text parts of a 200 response (blocking: JSON, base64).

    Raises ``ContentPolicy`` for a blocked prompt or image, ``GenerationFailed`` for a
    malformed response or one without an image.
    """
    try:
        payload = json.loads(content)
    except ValueError as exc:
        raise GenerationFailed(f"{generator}: provider returned malformed JSON", generator=generator) from exc
    if not isinstance(payload, dict):
        raise GenerationFailed(f"{generator}: provider returned an unexpected JSON shape", generator=generator)
    block = _dict(payload.get("promptFeedback")).get("blockReason")
    if block:
        raise ContentPolicy(
            f"{generator}: the prompt was blocked by the provider's safety system ({block})",
            error_type=str(block),
            generator=generator,
        )
    encoded: list[str] = []
    texts: list[str] = []
    finish: str | None = None
    candidates = payload.get("candidates")
    for candidate in candidates if isinstance(candidates, list) else []:
        candidate = _dict(candidate)
        finish = finish or candidate.get("finishReason")
        parts = _dict(candidate.get("content")).get("parts")
        for part in parts if isinstance(parts, list) else []:
            part = _dict(part)
            if part.get("thought"):  # 3.x models show interim "thinking" images; the answer follows
                continue
            blob = _dict(part.get("inlineData") or part.get("inline_data"))
            mime = str(blob.get("mimeType") or blob.get("mime_type") or "image/")
            if isinstance(blob.get("data"), str) and mime.startswith("image/"):
                encoded.append(blob["data"])
            elif isinstance(part.get("text"), str):
                texts.append(part["text"])
    if not encoded:
        if finish in POLICY_FINISH_REASONS:
            raise ContentPolicy(
                f"{generator}: the image was blocked by the provider's safety system ({finish})",
                error_type=finish,
                generator=generator,
            )
        said = f"; it answered with text only: {' '.join(texts)[:MAX_DETAIL_CHARS]!r}" if texts else ""
        raise GenerationFailed(
            f"{generator}: the response held no image (finishReason {finish or 'missing'}){said}",
            error_type=finish or "NO_IMAGE",
            generator=generator,
        )
    images = []
    for data in map(partial(decode_base64_image, generator=generator), encoded):
        fmt = image_format_of(data)
        if fmt is None:
            raise GenerationFailed(f"{generator}: provider returned an image that is not PNG, JPEG or WebP")
        images.append((data, fmt))
    return images, texts


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _retry_delay(details: list[Any]) -> float | None:
    """``google.rpc.RetryInfo.retryDelay`` ("37s", "1.5s") from an error's details."""
    for detail in details:
        delay = _dict(detail).get("retryDelay")
        if isinstance(delay, str) and (match := re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)s\s*", delay)):
            return float(match.group(1))
    return None


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
        client = self.require_client()
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
            error = _dict(_dict(response.json()).get("error"))
        except ValueError:
            error = {}
        status_name = error.get("status") if isinstance(error.get("status"), str) else None
        raw_details = error.get("details")
        details: list[Any] = raw_details if isinstance(raw_details, list) else []
        # Scrubbed before it is cut: a key straddling the cut would otherwise leave half of it.
        message = scrub(str(error.get("message") or response.text or ""), self._key)[:MAX_DETAIL_CHARS]
        detail = scrub(f"{status_name}: {message}" if status_name else message, self._key)
        retry_after = parse_retry_after(response.headers.get("retry-after")) or _retry_delay(details)
        reasons = {_dict(d).get("reason") for d in details}
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
