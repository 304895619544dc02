"""A fake OpenAI Images API on 127.0.0.1 (API_CONTRACTS.md section 2.5), strict about what it accepts.

Use ``with fake_openai() as fake:`` and point a generator at ``fake.base_url``; knobs on ``fake`` script
errors (``fake.fail_next(rate_limited("7"))``), slowness (``delay_s``) and malformed answers (``malformed``).
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Literal

from tests.fakes.images import solid_bytes
from tests.fakes.multipart import UploadedFile, parse_multipart
from tests.fakes.server import JSONHandler, RecordedRequest, serve_in_thread

DEFAULT_KEY = "sk-fake-openai-0123456789abcdef"
Malformed = Literal["json", "no_data", "bad_base64", "not_image"]
MODELS = ("gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "gpt-image-2", "dall-e-2", "dall-e-3")
# OpenAI's shutdown dates (issue 9, from the official SDK's notes): from that day on the model is gone.
SHUTDOWN = {
    "gpt-image-1": date(2026, 10, 23),
    "dall-e-2": date(2026, 5, 12),
    "dall-e-3": date(2026, 5, 12),
    "gpt-image-1-mini": date(2026, 12, 1),
    "gpt-image-1.5": date(2026, 12, 1),
}
# What each model's edits endpoint takes for input_fidelity; a model not listed takes none.
INPUT_FIDELITY = {
    "gpt-image-1": {"high", "low"},
    "gpt-image-1.5": {"high", "low"},
    "gpt-image-1-mini": {"low"},
}
SIZES = {
    "gpt-image": {"1024x1024", "1536x1024", "1024x1536", "auto"},
    "dall-e-3": {"1024x1024", "1792x1024", "1024x1792"},
    "dall-e-2": {"256x256", "512x512", "1024x1024"},
}
GPT_ONLY = {"background", "output_format", "output_compression", "moderation", "input_fidelity"} | {
    "stream",
    "partial_images",
}
GENERATION_FIELDS = {"prompt", "model", "n", "size", "quality", "response_format", "style", "user"} | GPT_ONLY
EDIT_FIELDS = (GENERATION_FIELDS - {"style", "moderation", "stream", "partial_images"}) | {"mask"}
CHOICES = {
    "background": {"transparent", "opaque", "auto"},
    "output_format": {"png", "jpeg", "webp"},
    "moderation": {"low", "auto"},
    "style": {"vivid", "natural"},
    "response_format": {"url", "b64_json"},
}


@dataclass
class ImagesRequest(RecordedRequest):
    """A recorded request; headers have lower-case names, multipart bodies are parsed."""

    form: dict[str, list[str]] = field(default_factory=dict)
    files: list[UploadedFile] = field(default_factory=list)
    multipart: bool = False
    multipart_error: str | None = None


@dataclass
class ScriptedError:
    """An error answer in OpenAI's envelope ``{"error": {message, type, param, code}}``."""

    status: int
    message: str
    type: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code, **self.extra}}


def rate_limited(retry_after: str | None = "7", *, retry_after_ms: str | None = None) -> ScriptedError:
    headers = {k: v for k, v in (("retry-after", retry_after), ("retry-after-ms", retry_after_ms)) if v is not None}
    message = "Rate limit reached for images per min. Please try again later."
    return ScriptedError(429, message, "requests", "rate_limit_exceeded", headers)


def insufficient_quota() -> ScriptedError:
    message = "You exceeded your current quota, please check your plan and billing details."
    return ScriptedError(429, message, "insufficient_quota", "insufficient_quota")


def moderation_blocked() -> ScriptedError:
    """The GPT-image flavour of a safety refusal."""
    message = "Your request was rejected by the safety system. If you believe this is an error, contact us."
    extra = {"safety_violations": ["violence"]}
    return ScriptedError(400, message, "image_generation_user_error", "moderation_blocked", extra=extra)


def content_policy_violation(*, null_code: bool = False) -> ScriptedError:
    """The dall-e flavour; older responses carried ``code: null``."""
    message = "Your request was rejected as a result of our safety system. Your prompt may contain disallowed text."
    return ScriptedError(400, message, "invalid_request_error", None if null_code else "content_policy_violation")


def server_error(status: int = 500) -> ScriptedError:
    message = "The server had an error while processing your request. Sorry about that!"
    return ScriptedError(status, message, "server_error")


def invalid_request(message: str = "Invalid value for 'size'.") -> ScriptedError:
    return ScriptedError(400, message, "invalid_request_error", "invalid_value")


@dataclass
class FakeOpenAI:
    """State and scenario knobs of one fake server; ``requests`` records everything it was sent."""

    api_key: str = DEFAULT_KEY
    url: str = ""  # http://127.0.0.1:<port>, set once serving
    revised_prompt: str | None = None  # set: every image carries it (a model that echoes its input)
    delay_s: float = 0.0  # before answering API calls; ended early when the fake shuts down
    malformed: Malformed | None = None  # a 200 whose body is broken this way
    answer_with_url: bool = False  # dall-e: URLs even when b64_json was asked for
    # The fake's calendar: models whose shutdown date has come are refused, as OpenAI does. Tests of
    # a model with a shutdown date pin it to a day before that date.
    today: date = field(default_factory=date.today)
    new_models: tuple[str, ...] = ()  # models OpenAI released after MODELS was written
    requests: list[ImagesRequest] = field(default_factory=list)
    errors: deque[ScriptedError] = field(default_factory=deque)
    served_files: dict[str, bytes] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def reset(self) -> None:
        """Back to a clean, well-behaved server, so one fake can serve a whole test module."""
        self.release.set()  # let any handler still sleeping from the last test finish
        with self.lock:
            self.requests.clear()
        self.errors.clear()
        self.served_files.clear()
        self.delay_s, self.malformed, self.answer_with_url = 0.0, None, False
        self.today, self.new_models = date.today(), ()
        self.revised_prompt = None
        self.release = threading.Event()

    def fail_next(self, error: ScriptedError, times: int = 1) -> None:
        """Answer the next ``times`` API calls (after the auth check) with ``error``."""
        self.errors.extend([error] * times)

    def api_requests(self, path: str) -> list[ImagesRequest]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def next_id(self) -> int:
        with self.lock:
            return next(self._ids)

    def serves(self, model: str) -> bool:
        """The model exists at this fake's OpenAI today."""
        if model in self.new_models:
            return True
        return model in MODELS and not (model in SHUTDOWN and SHUTDOWN[model] <= self.today)


def model_not_found(model: str) -> ScriptedError:
    message = f"The model `{model}` does not exist or you do not have access to it."
    return ScriptedError(404, message, "invalid_request_error", "model_not_found")


def _size_ok(model: str, size: str) -> bool:
    if model == "gpt-image-2" and size != "auto":
        match = re.fullmatch(r"(\d+)x(\d+)", size)
        if match is None:
            return False
        w, h = int(match[1]), int(match[2])
        return w % 16 == h % 16 == 0 and max(w, h) <= 3840 and w * h <= 3840 * 2160 and max(w / h, h / w) <= 3
    return size in SIZES["gpt-image" if model.startswith("gpt-image") else model]


def validate_images_request(params: dict[str, Any], *, edit: bool, images: list[str]) -> str | None:
    """The 400 message OpenAI would give for ``params`` (contract 2.1/2.2), or None when acceptable."""
    unknown = sorted(set(params) - (EDIT_FIELDS if edit else GENERATION_FIELDS))
    if unknown:
        return f"Unknown parameter: '{unknown[0]}'."
    model, gpt = params.get("model"), str(params.get("model")).startswith("gpt-image")
    if not params.get("prompt"):
        return "Missing required parameter: 'prompt'."
    if edit and model == "dall-e-3":
        return "Invalid value for 'model': dall-e-3 does not support image edits."
    if edit and (not images or len(images) > (16 if gpt else 1) or not set(images) <= {"image", "image[]"}):
        return f"Invalid 'image': expected 1 to {16 if gpt else 1} files as 'image' or 'image[]', got {images}."
    try:
        n = int(params.get("n", 1))
    except (TypeError, ValueError):
        return "Invalid type for 'n': expected an integer."
    if not 1 <= n <= (1 if model == "dall-e-3" else 10):
        return f"Invalid value for 'n': {n} is not supported for {model}."
    if "size" in params and not _size_ok(str(model), str(params["size"])):
        return f"Invalid value for 'size': {params['size']!r} is not supported for {model}."
    qualities = {"low", "medium", "high", "auto"} if gpt else {"standard", "hd"}
    if "quality" in params and params["quality"] not in qualities:
        return f"Invalid value for 'quality': {params['quality']!r}."
    if gpt and "response_format" in params:
        return f"Unknown parameter: 'response_format' is not supported with {model}."
    misplaced = sorted(k for k in params if (k in GPT_ONLY and not gpt) or (k == "style" and model != "dall-e-3"))
    if misplaced:
        return f"Unknown parameter: '{misplaced[0]}' is not supported with {model}."
    for key, choices in CHOICES.items():
        if key in params and params[key] not in choices:
            return f"Invalid value for '{key}': {params[key]!r}."
    if "input_fidelity" in params:
        fidelity = INPUT_FIDELITY.get(str(model), set())
        if not fidelity:
            return f"Unknown parameter: 'input_fidelity' is not supported with {model}."
        if params["input_fidelity"] not in fidelity:
            return f"Invalid value for 'input_fidelity': {params['input_fidelity']!r} is not supported for {model}."
    return None


def tiny_image(size: str, fmt: str = "png", shade: int = 0) -> bytes:
    """A real image 1/128 of ``size`` per side (8x12 for 1024x1536); 8x8 for ``auto``."""
    match = re.fullmatch(r"(\d+)x(\d+)", size)
    width, height = (max(1, int(match[1]) // 128), max(1, int(match[2]) // 128)) if match else (8, 8)
    return solid_bytes((40 * shade % 256, 120, 200), (width, height), fmt)


class _Handler(JSONHandler):
    fake: FakeOpenAI

    def do_GET(self) -> None:
        record = self._record(b"")
        if self.path.startswith("/files/"):
            data = self.fake.served_files.get(self.path.removeprefix("/files/"))
            if data is None:
                return self._error(ScriptedError(404, "no such file"))
            return self.send_bytes(200, data, "image/png")
        if self._refused(record):
            return
        model = re.fullmatch(r"/v1/models/([\w.-]+)", self.path)
        if model is None or not self.fake.serves(model[1]):
            return self._error(model_not_found(model[1] if model else self.path))
        model_info = {"id": model[1], "object": "model", "created": 1_700_000_000, "owned_by": "system"}
        self._send(200, json.dumps(model_info).encode())  # _send: the client may have timed out and gone

    def do_POST(self) -> None:
        record = self._record(self.read_body())
        if self._refused(record):
            return
        if self.path not in ("/v1/images/generations", "/v1/images/edits"):
            return self._error(ScriptedError(404, f"Invalid URL (POST {self.path})", "invalid_request_error"))
        edit = self.path.endswith("/edits")
        if edit and (not record.multipart or record.multipart_error):
            message = f"The edits endpoint takes multipart/form-data ({record.multipart_error or 'not multipart'})."
            return self._error(ScriptedError(400, message, "invalid_request_error"))
        try:
            params = record.json() if not edit else {k: v[-1] for k, v in record.form.items()}
            if not isinstance(params, dict):
                raise ValueError("not an object")
        except ValueError:
            message = "We could not parse the JSON body of your request."
            return self._error(ScriptedError(400, message, "invalid_request_error"))
        if not self.fake.serves(str(params.get("model"))):
            return self._error(model_not_found(str(params.get("model"))))
        problem = validate_images_request(params, edit=edit, images=[f.field for f in record.files])
        if problem is not None:
            return self._error(ScriptedError(400, problem, "invalid_request_error", "invalid_value"))
        self._answer(params)

    def _record(self, body: bytes) -> ImagesRequest:
        headers = {k.lower(): v for k, v in self.headers.items()}
        record = ImagesRequest(self.command, self.path, headers, body)
        if headers.get("content-type", "").startswith("multipart/form-data"):
            record.multipart = True
            try:
                record.form, record.files = parse_multipart(body, headers["content-type"])
            except (ValueError, UnicodeDecodeError) as exc:
                record.multipart_error = str(exc)
        with self.fake.lock:
            self.fake.requests.append(record)
        return record

    def _refused(self, record: ImagesRequest) -> bool:
        """Delay, bearer check, then scripted errors: True when an error was sent."""
        if self.fake.delay_s:
            self.fake.release.wait(self.fake.delay_s)
        presented = record.headers.get("authorization", "")
        if presented != f"Bearer {self.fake.api_key}":
            # Echo the presented key in full, the worst case, so tests can prove clients scrub it.
            key = presented.removeprefix("Bearer ")
            message = f"Incorrect API key provided: {key}. You can find your API key at https://platform.openai.com."
            self._error(ScriptedError(401, message, "invalid_request_error", "invalid_api_key"))
            return True
        try:
            error = self.fake.errors.popleft()
        except IndexError:
            return False
        self._error(error)
        return True

    def _error(self, error: ScriptedError) -> None:
        self._send(error.status, json.dumps(error.body()).encode(), error.headers)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        headers = {"x-request-id": f"req_{self.fake.next_id()}", **(headers or {})}
        try:
            self.send_bytes(status, body, "application/json", headers)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test); nothing to answer

    def _answer(self, params: dict[str, Any]) -> None:
        model, size = str(params["model"]), str(params.get("size", "1024x1024"))
        n = int(params.get("n", 1))
        gpt = model.startswith("gpt-image")
        fmt = str(params.get("output_format", "png")) if gpt else "png"
        as_url = not gpt and (params.get("response_format", "url") == "url" or self.fake.answer_with_url)
        data: list[dict[str, Any]] = []
        for index in range(n):
            image = tiny_image(size, fmt, index)
            if as_url:
                name = f"img-{self.fake.next_id()}.png"
                self.fake.served_files[name] = image
                data.append({"url": f"{self.fake.url}/files/{name}"})
            else:
                data.append({"b64_json": base64.b64encode(image).decode()})
            if model == "dall-e-3":
                data[-1]["revised_prompt"] = f"A detailed rendering of {params['prompt']}"
            if self.fake.revised_prompt is not None:
                data[-1]["revised_prompt"] = self.fake.revised_prompt
        payload: dict[str, Any] = {"created": int(time.time()), "data": data}
        if gpt:
            usage = {"input_tokens": 10, "output_tokens": 272 * n, "total_tokens": 10 + 272 * n}
            payload.update(size=size, quality=params.get("quality", "auto"), output_format=fmt, usage=usage)
            payload["background"] = params.get("background", "opaque")
        self._send(200, self._break(payload))

    def _break(self, payload: dict[str, Any]) -> bytes:
        broken = self.fake.malformed
        if broken == "json":
            return b'{"created": 1, "data": [{"b64_json": "iVBOR'
        if broken == "no_data":
            payload["data"] = []
        elif broken == "bad_base64":
            payload["data"] = [{"b64_json": "not base64 at all!"}]
        elif broken == "not_image":
            payload["data"] = [{"b64_json": base64.b64encode(b"definitely not an image").decode()}]
        return json.dumps(payload).encode()


@contextmanager
def fake_openai(**knobs: Any) -> Iterator[FakeOpenAI]:
    """Serve a fresh ``FakeOpenAI(**knobs)``; slow handlers are released before the server stops."""
    fake = FakeOpenAI(**knobs)
    handler = type("FakeOpenAIHandler", (_Handler,), {"fake": fake})
    with serve_in_thread(handler) as url:
        fake.url = url
        try:
            yield fake
        finally:
            fake.release.set()
