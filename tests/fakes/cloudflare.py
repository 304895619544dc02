"""A fake Cloudflare Workers AI API (``ai/run/{model}``, ``ai/models/search``), per API_CONTRACTS.md section 4.

Each model has its own input schema (``SCHEMAS``: fields, steps name and limit, whether it needs an
image); unknown fields are a 400 as the published schemas' ``additionalProperties: false`` makes them.

Use as ``with FakeCloudflare() as fake:``; set ``fake.scenario`` per test, point the
generator's ``base_url`` at ``fake.base_url`` and pass ``environ=fake.environ``.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from tests.fakes.images import solid_bytes
from tests.fakes.server import JSONHandler, RecordedRequest, Recorder, serve_in_thread

Scenario = Literal[
    "ok",  # {"result": {"image": <base64 JPEG>}, "success": true, ...}
    "raw_png",  # 200 image/png bytes (how some other Workers AI image models answer)
    "daily_limit",  # 429, code 3036 (daily free allocation used up)
    "capacity",  # 429, code 3040 (out of capacity), with Retry-After
    "timeout",  # 408, code 3007
    "internal",  # 500, generic internal error
    "nsfw",  # 400 whose message reports NSFW content (the real shape is UNCONFIRMED)
    "success_false",  # 200 with success false (envelope error without an HTTP error)
    "no_image",  # 200, success true, result without an image
    "malformed",  # 200 with a body that is not JSON
    "echo_secrets",  # 500 whose message repeats the token and account id it was sent
    "slow",  # answers only after ``delay_s`` (or when the fake shuts down)
]
RUN_PATH = re.compile(r"^/client/v4/accounts/([^/]+)/ai/run/(@[^/]+/[^/]+/[^/]+)$")
SEARCH_PATH = re.compile(r"^/client/v4/accounts/([^/]+)/ai/models/search$")
SCHEMA_ERROR = 5006  # "invalid input" for schema violations (code as commonly reported; UNCONFIRMED)
FLUX = "@cf/black-forest-labs/flux-1-schnell"
SDXL = "@cf/stabilityai/stable-diffusion-xl-base-1.0"
SDXL_LIGHTNING = "@cf/bytedance/stable-diffusion-xl-lightning"
SD_IMG2IMG = "@cf/runwayml/stable-diffusion-v1-5-img2img"


@dataclass(frozen=True)
class Schema:
    fields: frozenset[str]  # besides prompt
    steps_field: str
    max_steps: int
    needs_image: bool = False
    answers_png: bool = False  # raw image/png bytes instead of the JSON envelope


# flux-1-schnell: prompt, steps <= 8, and seed (Cloudflare's own examples send it). The Stable
# Diffusion models share one schema: num_steps <= 20, sizes 256..2048, image/image_b64 + strength.
SD_FIELDS = frozenset(
    {"negative_prompt", "height", "width", "image", "image_b64", "mask", "num_steps", "strength", "guidance", "seed"}
)
SCHEMAS = {
    FLUX: Schema(frozenset({"steps", "seed"}), "steps", 8),
    SDXL: Schema(SD_FIELDS, "num_steps", 20, answers_png=True),
    SDXL_LIGHTNING: Schema(SD_FIELDS, "num_steps", 20, answers_png=True),
    SD_IMG2IMG: Schema(SD_FIELDS, "num_steps", 20, needs_image=True, answers_png=True),
}
GENERIC = Schema(frozenset({"steps"}), "steps", 8)  # a model a test adds with ``models=``


def tiny_image(fmt: str = "jpeg", size: tuple[int, int] = (8, 8)) -> bytes:
    """A real, decodable image made in memory."""
    return solid_bytes((30, 90, 200), size, fmt)


def envelope(result: Any = None, errors: list[tuple[int, str]] | None = None) -> dict[str, Any]:
    """Cloudflare's v4 response envelope."""
    errs = [{"code": code, "message": message} for code, message in errors or []]
    return {"result": result, "success": not errs, "errors": errs, "messages": []}


class FakeCloudflare:
    """Scenario knobs are plain attributes; change them between requests."""

    def __init__(
        self,
        *,
        api_token: str = "test-cf-token",
        account_id: str = "0123456789abcdef0123456789abcdef",
        models: tuple[str, ...] = tuple(SCHEMAS),
    ) -> None:
        self.api_token = api_token
        self.account_id = account_id
        self._models = frozenset(models)
        self.recorder = Recorder()
        self.released = threading.Event()
        self._stack = ExitStack()
        self.url = ""
        self.reset()

    def reset(self) -> None:
        """Back to the default scenario with nothing recorded (to share one server across tests)."""
        self.models = set(self._models)
        self.scenario: Scenario = "ok"
        self.max_prompt_chars = 2048
        self.extra_fields: dict[str, frozenset[str]] = {}  # per model: fields a test says it also takes
        self.retry_after: str | None = "3"
        self.delay_s = 5.0
        with self.recorder.lock:
            self.recorder.requests.clear()

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.recorder.requests

    @property
    def base_url(self) -> str:
        return f"{self.url}/client/v4"

    @property
    def environ(self) -> dict[str, str]:
        return {"CLOUDFLARE_ACCOUNT_ID": self.account_id, "CLOUDFLARE_API_TOKEN": self.api_token}

    def __enter__(self) -> FakeCloudflare:
        handler = type("Handler", (_CloudflareHandler,), {"fake": self, "recorder": self.recorder})
        self.url = self._stack.enter_context(serve_in_thread(handler))
        self._stack.callback(self.released.set)  # runs first: frees handlers stuck in "slow"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def validate(self, model: str, body: bytes) -> str | None:
        """The model's schema (``SCHEMAS``): the 400 message for ``body``, or None when it passes."""
        schema = SCHEMAS.get(model, GENERIC)
        try:
            request = json.loads(body)
        except ValueError:
            return "Request is missing headers or body: invalid JSON"
        if not isinstance(request, dict):
            return "Error: the body must be an object"
        prompt = request.get("prompt")
        if not isinstance(prompt, str) or not 1 <= len(prompt) <= self.max_prompt_chars:
            return f"Error: /prompt must be a string of 1 to {self.max_prompt_chars} characters"
        extra = sorted(set(request) - {"prompt"} - schema.fields - self.extra_fields.get(model, frozenset()))
        if extra:
            return f"Error: must NOT have additional properties: {', '.join(extra)}"
        steps = request.get(schema.steps_field, 1)
        if not _is_int(steps) or not 1 <= steps <= schema.max_steps:
            return f"Error: /{schema.steps_field} must be an integer from 1 to {schema.max_steps}"
        for side in ("width", "height"):
            if side in request and (not _is_int(request[side]) or not 256 <= request[side] <= 2048):
                return f"Error: /{side} must be an integer from 256 to 2048"
        if "seed" in request and not _is_int(request["seed"]):
            return "Error: /seed must be an integer"
        for name, low, high in (("strength", 0.0, 1.0), ("guidance", 0.0, 30.0)):
            value = request.get(name, low)
            if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
                return f"Error: /{name} must be a number from {low} to {high}"
        image = request.get("image_b64")
        if image is not None:
            try:
                base64.b64decode(image, validate=True)
            except (ValueError, TypeError):
                return "AiError: invalid base64 data"  # code 5004 in Cloudflare's table
        if schema.needs_image and image is None and "image" not in request:
            return "Error: /image or /image_b64 is required"
        return None

    def answers_png(self, model: str) -> bool:
        return SCHEMAS.get(model, GENERIC).answers_png

    def answer(self, token: str, account_id: str, model: str) -> tuple[int, Any, dict[str, str], str]:
        """(status, body, headers, content type) for an authenticated, valid request."""
        scenario = self.scenario
        if scenario == "slow":
            self.released.wait(self.delay_s)
        errors: dict[str, tuple[int, int, str]] = {
            "daily_limit": (429, 3036, "You have used up your daily free allocation of 10,000 neurons."),
            "capacity": (429, 3040, "No more data centers to forward the request to"),
            "timeout": (408, 3007, "Request timeout"),
            "internal": (500, 5000, "Internal server error"),
            "nsfw": (400, 3030, "AiError: Input prompt contains NSFW content."),
            "success_false": (200, 5000, "Inference failed"),
            "echo_secrets": (500, 5000, f"failed for token {token} on account {account_id}"),
        }
        if scenario in errors:
            status, code, message = errors[scenario]
            headers = {"Retry-After": self.retry_after} if scenario == "capacity" and self.retry_after else {}
            return status, envelope(errors=[(code, message)]), headers, "application/json"
        if scenario == "raw_png" or self.answers_png(model):
            return 200, tiny_image("png"), {}, "image/png"
        if scenario == "malformed":
            return 200, b"<html>bad gateway</html>", {}, "text/html"
        if scenario == "no_image":
            return 200, envelope(result={}), {}, "application/json"
        image = base64.b64encode(tiny_image("jpeg")).decode()
        return 200, envelope(result={"image": image}), {}, "application/json"


class _CloudflareHandler(JSONHandler):
    fake: FakeCloudflare

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {self.fake.api_token}":
            return True
        self.send_json(401, envelope(errors=[(10000, "Authentication error")]))
        return False

    def do_GET(self) -> None:
        self.read_body()
        url = urlsplit(self.path)
        if SEARCH_PATH.match(url.path) is None:
            self.send_json(404, envelope(errors=[(7003, "No route for that URI")]))
            return
        if not self._authorized():
            return
        term = (parse_qs(url.query).get("search") or [""])[0]
        found = [{"name": name, "task": {"name": "Text-to-Image"}} for name in sorted(self.fake.models) if term in name]
        self.send_json(200, envelope(result=found))

    def do_POST(self) -> None:
        body = self.read_body()
        match = RUN_PATH.match(urlsplit(self.path).path)
        if match is None:
            self.send_json(404, envelope(errors=[(7003, "No route for that URI")]))
            return
        if not self._authorized():
            return
        if match.group(2) not in self.fake.models:
            self.send_json(400, envelope(errors=[(5007, f"No such model {match.group(2)} or task")]))
            return
        problem = self.fake.validate(match.group(2), body)
        if problem is not None:
            self.send_json(400, envelope(errors=[(SCHEMA_ERROR, problem)]))
            return
        status, payload, headers, content_type = self.fake.answer(self.fake.api_token, match.group(1), match.group(2))
        try:
            raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_bytes(status, raw, content_type, headers)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
            pass


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
