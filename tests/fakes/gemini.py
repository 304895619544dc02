"""A fake Gemini API (``generateContent`` and ``models/{model}``), per API_CONTRACTS.md section 3.4.

Use as ``with FakeGemini() as fake:``; set ``fake.scenario`` (and friends) per test and point
the generator's ``base_url`` at ``fake.url`` with ``environ=fake.environ``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from PIL import Image

from tests.fakes.images import solid_bytes
from tests.fakes.server import JSONHandler, RecordedRequest, Recorder, serve_in_thread

Scenario = Literal[
    "ok",  # one image part (plus a text part if ``text`` is set)
    "prompt_block",  # 200, no candidates, promptFeedback.blockReason
    "image_block",  # 200, finishReason IMAGE_SAFETY, no image part
    "text_only",  # 200, finishReason STOP, only a text part
    "rate_limit",  # 429 RESOURCE_EXHAUSTED (+ Retry-After header and RetryInfo detail)
    "forbidden",  # 403 PERMISSION_DENIED
    "internal",  # 500 INTERNAL
    "unavailable",  # 503 UNAVAILABLE
    "malformed",  # 200 with a body that is not JSON
    "bad_base64",  # 200 with an inlineData part that is not base64
    "echo_key",  # 500 whose message repeats the key it was sent (to test scrubbing)
    "slow",  # answers only after ``delay_s`` (or when the fake shuts down)
]
GENERATE_PATH = re.compile(r"^/v1beta/models/([^/:]+):generateContent$")
MODEL_PATH = re.compile(r"^/v1beta/models/([^/:]+)$")
STATUS_NAMES = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED"}
STATUS_NAMES |= {500: "INTERNAL", 503: "UNAVAILABLE"}


def tiny_image(fmt: str = "png", size: tuple[int, int] = (8, 8)) -> bytes:
    """A real, decodable image made in memory."""
    return solid_bytes((200, 60, 30), size, fmt)


class FakeGemini:
    """Scenario knobs are plain attributes; change them between requests."""

    def __init__(self, *, api_key: str = "test-gemini-key", models: tuple[str, ...] = ("gemini-2.5-flash-image",)):
        self.api_key = api_key
        self._models = frozenset(models)
        self.recorder = Recorder()
        self.image_parts_seen: list[int] = []
        self.released = threading.Event()
        self._stack = ExitStack()
        self.url = ""
        self.reset()

    def reset(self) -> None:
        """Back to the default scenario with nothing recorded (to share one server across tests)."""
        self.models = set(self._models)
        self.scenario: Scenario = "ok"
        self.image_format = "png"
        self.text: str | None = "Here is your picture."
        self.block_reason = "SAFETY"
        self.finish_reason = "IMAGE_SAFETY"
        self.retry_after: str | None = "7"
        self.retry_delay: str | None = "7s"
        self.delay_s = 5.0
        with self.recorder.lock:
            self.recorder.requests.clear()
        self.image_parts_seen.clear()

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.recorder.requests

    @property
    def environ(self) -> dict[str, str]:
        return {"GEMINI_API_KEY": self.api_key}

    def __enter__(self) -> FakeGemini:
        handler = type("Handler", (_GeminiHandler,), {"fake": self, "recorder": self.recorder})
        self.url = self._stack.enter_context(serve_in_thread(handler))
        self._stack.callback(self.released.set)  # runs first: frees handlers stuck in "slow"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def error_body(self, status: int, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {"error": {"code": status, "message": message, "status": STATUS_NAMES[status], "details": details or []}}

    def answer(self, image_parts: int) -> tuple[int, Any, dict[str, str]]:
        """(status, JSON body or raw bytes, headers) for a well-formed, authenticated request."""
        self.image_parts_seen.append(image_parts)
        scenario = self.scenario
        if scenario == "slow":
            self.released.wait(self.delay_s)
        if scenario == "rate_limit":
            info = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": self.retry_delay}]
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return 429, self.error_body(429, "Resource has been exhausted (e.g. check quota).", info), headers
        errors = {"forbidden": (403, "Permission denied."), "internal": (500, "Internal error encountered.")}
        errors |= {"unavailable": (503, "The model is overloaded."), "echo_key": (500, f"bad key {self.api_key}")}
        if scenario in errors:
            status, message = errors[scenario]
            return status, self.error_body(status, message), {}
        if scenario == "malformed":
            return 200, b"<html>not json</html>", {}
        usage = {"promptTokenCount": 12, "candidatesTokenCount": 1290, "totalTokenCount": 1302}
        if scenario == "prompt_block":
            return 200, {"promptFeedback": {"blockReason": self.block_reason}, "usageMetadata": usage}, {}
        parts: list[dict[str, Any]] = [{"text": self.text}] if self.text else []
        finish = "STOP"
        if scenario == "image_block":
            parts, finish = [], self.finish_reason
        elif scenario == "text_only":
            parts = [{"text": self.text or "I cannot draw that."}]
        elif scenario == "bad_base64":
            parts.append({"inlineData": {"mimeType": "image/png", "data": "!!not base64!!"}})
        else:
            data = base64.b64encode(tiny_image(self.image_format)).decode()
            parts.append({"inlineData": {"mimeType": f"image/{self.image_format}", "data": data}})
        candidate = {"content": {"role": "model", "parts": parts}, "finishReason": finish, "index": 0}
        return 200, {"candidates": [candidate], "usageMetadata": usage, "modelVersion": "fake"}, {}


class _GeminiHandler(JSONHandler):
    fake: FakeGemini

    def _authorized(self) -> bool:
        query = parse_qs(urlsplit(self.path).query)
        key = self.headers.get("x-goog-api-key") or (query.get("key") or [""])[0]
        if key == self.fake.api_key:
            return True
        detail = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
        self.send_json(400, self.fake.error_body(400, "API key not valid. Please pass a valid API key.", [detail]))
        return False

    def _unknown_model(self, model: str) -> bool:
        if model in self.fake.models:
            return False
        self.send_json(404, self.fake.error_body(404, f"models/{model} is not found for API version v1beta"))
        return True

    def do_GET(self) -> None:
        self.read_body()
        match = MODEL_PATH.match(urlsplit(self.path).path)
        if match is None:
            self.send_json(404, self.fake.error_body(404, "Not found"))
        elif self._authorized() and not self._unknown_model(match.group(1)):
            model = match.group(1)
            methods = ["generateContent", "countTokens"]
            self.send_json(
                200, {"name": f"models/{model}", "displayName": model, "supportedGenerationMethods": methods}
            )

    def do_POST(self) -> None:
        body = self.read_body()
        match = GENERATE_PATH.match(urlsplit(self.path).path)
        if match is None:
            self.send_json(404, self.fake.error_body(404, "Not found"))
            return
        if not self._authorized() or self._unknown_model(match.group(1)):
            return
        try:
            image_parts = _count_image_parts(body)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            self.send_json(400, self.fake.error_body(400, f"Invalid JSON payload received. {exc!r}"))
            return
        status, payload, headers = self.fake.answer(image_parts)
        try:
            if isinstance(payload, bytes):
                self.send_bytes(status, payload, "text/html", headers)
            else:
                self.send_json(status, payload, headers)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
            pass


# What the v1beta proto-JSON parser knows (camelCase and snake_case both parse); anything else is a
# 400 INVALID_ARGUMENT "Unknown name", and an enum value it does not know is a 400 "Invalid value".
REQUEST_FIELDS = {"contents", "generationConfig", "safetySettings", "systemInstruction", "tools", "toolConfig"}
REQUEST_FIELDS |= {"cachedContent"}
GENERATION_FIELDS = {"responseModalities", "imageConfig", "temperature", "topP", "topK", "candidateCount"}
GENERATION_FIELDS |= {"maxOutputTokens", "stopSequences", "seed", "responseMimeType", "presencePenalty"}
GENERATION_FIELDS |= {"frequencyPenalty", "thinkingConfig", "mediaResolution", "responseSchema", "responseLogprobs"}
IMAGE_CONFIG_FIELDS = {"aspectRatio", "imageSize"}
MODALITIES = {"MODALITY_UNSPECIFIED", "TEXT", "IMAGE", "AUDIO"}
ASPECT_RATIOS = {"1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"}
IMAGE_SIZES = {"1K", "2K", "4K"}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.title() for word in rest)


def _unknown(fields: dict[str, Any], known: set[str], where: str) -> None:
    for name in fields:
        if _camel(name) not in known:
            raise ValueError(f"Unknown name \"{name}\" at '{where}': Cannot find field.")


def _check_generation_config(config: Any) -> None:
    if not isinstance(config, dict):
        raise ValueError("Invalid value at 'generation_config': expected an object")
    _unknown(config, GENERATION_FIELDS, "generation_config")
    config = {_camel(key): value for key, value in config.items()}
    for index, modality in enumerate(config.get("responseModalities", [])):
        if modality not in MODALITIES:
            raise ValueError(f"Invalid value at 'generation_config.response_modalities[{index}]', \"{modality}\"")
    image = config.get("imageConfig", {})
    if not isinstance(image, dict):
        raise ValueError("Invalid value at 'generation_config.image_config': expected an object")
    _unknown(image, IMAGE_CONFIG_FIELDS, "generation_config.image_config")
    image = {_camel(key): value for key, value in image.items()}
    if "aspectRatio" in image and image["aspectRatio"] not in ASPECT_RATIOS:
        raise ValueError(f"Unsupported aspect ratio {image['aspectRatio']!r}")
    if "imageSize" in image and image["imageSize"] not in IMAGE_SIZES:
        raise ValueError(f"Unsupported image size {image['imageSize']!r}")


def _count_image_parts(body: bytes) -> int:
    """Validate the request the way the REST endpoint does (camel or snake keys)."""
    request = json.loads(body)
    _unknown(request, REQUEST_FIELDS, "")
    config = request.get("generationConfig", request.get("generation_config"))
    if config is not None:
        _check_generation_config(config)
    parts = request["contents"][0]["parts"]
    if not any(isinstance(part.get("text"), str) and part["text"] for part in parts):
        raise ValueError("a text part is required")
    count = 0
    for part in parts:
        blob = part.get("inlineData") or part.get("inline_data")
        if blob is None:
            continue
        if not (blob.get("mimeType") or blob.get("mime_type", "")).startswith("image/"):
            raise ValueError("inline data must be an image")
        try:
            Image.open(io.BytesIO(base64.b64decode(blob["data"], validate=True))).verify()
        except (binascii.Error, OSError, SyntaxError) as exc:
            raise ValueError(f"inline image could not be decoded: {exc}") from exc
        count += 1
    return count


def iter_inline_images(request: RecordedRequest) -> Iterator[tuple[str, bytes]]:
    """(mime, bytes) of every inline image part a recorded request carried."""
    for part in request.json()["contents"][0]["parts"]:
        if "inlineData" in part:
            yield part["inlineData"]["mimeType"], base64.b64decode(part["inlineData"]["data"])
