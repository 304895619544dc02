"""A fake Leonardo.ai REST API v1 plus the S3 bucket its init-image uploads go to, per
API_CONTRACTS.md section 6.

Routes under ``/api/rest/v1``: ``POST /generations``, ``GET``/``DELETE /generations/{id}``,
``POST /init-image``, ``DELETE /init-image/{id}``, ``GET /me``. ``POST /s3/bucket`` plays the
presigned S3 POST (every returned form field exactly, no extra ones, the file part last, no
``Authorization`` header: what S3 checks), ``GET /cdn/...`` serves the images. Use as
``with FakeLeonardo() as fake:``; set knobs per test, point ``base_url`` at ``fake.base_url``.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from tests.fakes.images import solid_bytes
from tests.fakes.multipart import parse_multipart
from tests.fakes.server import JSONHandler, RecordedRequest, Recorder, serve_in_thread

Scenario = Literal[
    "ok",  # PENDING for ``pending_polls`` polls, then COMPLETE with JPEG URLs on the fake's CDN
    "failed",  # PENDING, then FAILED
    "nsfw",  # COMPLETE, the first image flagged ``nsfw: true``
    "lost",  # polls answer ``generations_by_pk: null``
    "rate_limited",  # create answers 429 (with Retry-After)
    "moderation",  # create answers 400: the prompt was blocked by moderation (format UNCONFIRMED)
    "echo_key",  # create answers 500 with an error text quoting the bearer key it was sent (after ``echo_padding`` x's)
    "internal",  # create answers 500
    "malformed",  # create answers 200 with a body that is not JSON
    "hang",  # polls never complete (PENDING forever)
]
API = "/api/rest/v1"
PRESET_STYLES = frozenset(
    "ANIME BOKEH CINEMATIC CINEMATIC_CLOSEUP CREATIVE DYNAMIC ENVIRONMENT FASHION FILM FOOD GENERAL HDR "
    "ILLUSTRATION LEONARDO LONG_EXPOSURE MACRO MINIMALISTIC MONOCHROME MOODY NONE NEUTRAL PHOTOGRAPHY "
    "PORTRAIT RAYTRACED RENDER_3D RETRO SKETCH_BW SKETCH_COLOR STOCK_PHOTO VIBRANT UNPROCESSED".split()
)
EXTENSIONS = {"png": b"\x89PNG", "jpg": b"\xff\xd8\xff", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF"}


def hasura_error(text: str, code: str) -> dict[str, str]:
    return {"error": text, "path": "$", "code": code}


@dataclass
class Generation:
    id: str
    body: dict[str, Any]
    polls: int = 0
    deleted: bool = False
    urls: list[str] = field(default_factory=list)


@dataclass
class InitImage:
    id: str
    extension: str
    fields: dict[str, str]
    data: bytes | None = None  # set once the S3 POST arrived
    deleted: bool = False


class FakeLeonardo:
    def __init__(self, *, api_key: str = "00000000-test-leonardo-key") -> None:
        self.api_key = api_key
        self.recorder = Recorder()
        self.lock = threading.Lock()
        self._stack = ExitStack()
        self.url = ""
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.scenario: Scenario = "ok"
            self.pending_polls = 1
            self.echo_padding = 0
            self.failing_polls = 0  # the next polls answer 503 (then it counts down)
            self.create_started = threading.Event()
            self.create_gate: threading.Event | None = None  # set: create answers only once it is set
            self.generations: dict[str, Generation] = {}
            self.init_images: dict[str, InitImage] = {}
            self.s3_posts: list[tuple[dict[str, list[str]], list[str], dict[str, str]]] = []
        with self.recorder.lock:
            self.recorder.requests.clear()

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.recorder.requests

    def calls(self, method: str, prefix: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == method and urlsplit(r.path).path.startswith(API + prefix)]

    @property
    def base_url(self) -> str:
        return self.url + API

    @property
    def environ(self) -> dict[str, str]:
        return {"LEONARDO_API_KEY": self.api_key}

    def __enter__(self) -> FakeLeonardo:
        handler = type("Handler", (_LeonardoHandler,), {"fake": self, "recorder": self.recorder})
        self.url = self._stack.enter_context(serve_in_thread(handler))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    # -- the API's rules ------------------------------------------------------------------------------

    def validate(self, body: Any) -> str | None:
        """What the real API refuses (bounds from the SDK's field docs). Unknown body keys pass:
        whether Leonardo refuses them is not documented, and a fake must not be stricter."""
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str) or not body["prompt"]:
            return "prompt is required"
        for side in ("width", "height"):
            value = body.get(side, 512)
            if not isinstance(value, int) or not 32 <= value <= 1536 or value % 8:
                return f"{side} must be between 32 and 1536 and a multiple of 8"
        count = body.get("num_images", 4)
        large = max(body.get("width", 512), body.get("height", 512)) > 768
        if not isinstance(count, int) or not 1 <= count <= (4 if large else 8):
            return "num_images must be between 1 and 8 (1 and 4 when a side is over 768)"
        steps = body.get("num_inference_steps", 15)
        if not isinstance(steps, int) or not 10 <= steps <= 60:
            return "num_inference_steps must be between 10 and 60"
        guidance = body.get("guidance_scale", 7)
        if not isinstance(guidance, int) or isinstance(guidance, bool) or not 1 <= guidance <= 20:
            return "guidance_scale must be an integer between 1 and 20"
        if "presetStyle" in body and body["presetStyle"] not in PRESET_STYLES:
            return f"invalid presetStyle {body['presetStyle']!r}"
        strength = body.get("init_strength", 0.5)
        if not isinstance(strength, int | float) or not 0.1 <= strength <= 0.9:
            return "init_strength must be between 0.1 and 0.9"
        if "init_image_id" in body:
            image = self.init_images.get(body["init_image_id"])
            if image is None or image.data is None or image.deleted:
                return "init image not found (or never uploaded)"
            if not image.data.startswith(EXTENSIONS[image.extension]):
                return "the uploaded init image does not match its extension"
        for element in body.get("elements", []):
            if not isinstance(element, dict) or not isinstance(element.get("akUUID"), str):
                return "elements need an akUUID"
        return None

    def create(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        errors: dict[str, tuple[int, Any, dict[str, str]]] = {
            "rate_limited": (429, hasura_error("Too many requests", "rate-limit"), {"Retry-After": "4"}),
            "moderation": (400, hasura_error("Your prompt was blocked by our content moderation filter", "unexpected"), {}),
            "echo_key": (500, hasura_error("x" * self.echo_padding + f" error for key {self.api_key}", "unexpected"), {}),
            "internal": (500, hasura_error("Internal server error", "unexpected"), {}),
        }  # fmt: skip
        if self.scenario in errors:
            return errors[self.scenario]
        self.create_started.set()
        if self.create_gate is not None:
            self.create_gate.wait(5.0)
        generation = Generation(str(uuid.uuid4()), body)
        with self.lock:
            self.generations[generation.id] = generation
        return 200, {"sdGenerationJob": {"generationId": generation.id, "apiCreditCost": 10}}, {}

    def poll(self, generation_id: str) -> dict[str, Any]:
        with self.lock:
            generation = self.generations.get(generation_id)
            if generation is None or generation.deleted or self.scenario == "lost":
                return {"generations_by_pk": None}
            generation.polls += 1
            pending = generation.polls <= self.pending_polls or self.scenario == "hang"
        body = generation.body
        status = "PENDING" if pending else ("FAILED" if self.scenario == "failed" else "COMPLETE")
        images = []
        if status == "COMPLETE":
            count = body.get("num_images", 4)
            generation.urls = [f"{self.url}/cdn/{generation.id}/{n}.jpg" for n in range(count)]
            images = [
                {"id": str(uuid.uuid4()), "url": url, "nsfw": self.scenario == "nsfw" and n == 0, "likeCount": 0}
                for n, url in enumerate(generation.urls)
            ]
        return {
            "generations_by_pk": {
                "id": generation.id,
                "status": status,
                "prompt": body["prompt"],
                "modelId": body.get("modelId"),
                "imageWidth": body.get("width", 512),
                "imageHeight": body.get("height", 512),
                "seed": body.get("seed", 424242),
                "presetStyle": body.get("presetStyle"),
                "initStrength": body.get("init_strength"),
                "public": body.get("public", False),
                "generated_images": images,
            }
        }

    def new_init_image(self, extension: str) -> dict[str, Any]:
        image_id = str(uuid.uuid4())
        key = f"uploads/{image_id}.{extension}"
        fields = {
            "Content-Type": f"image/{'jpeg' if extension == 'jpg' else extension}",
            "bucket": "fake-leonardo-init-images",
            "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
            "X-Amz-Credential": "FAKEACCESSKEY/20261130/us-west-2/s3/aws4_request",
            "X-Amz-Date": "20261130T050000Z",
            "key": key,
            "Policy": "eyJleHBpcmF0aW9uIjoiZmFrZSJ9",
            "X-Amz-Signature": uuid.uuid4().hex,
        }
        with self.lock:
            self.init_images[image_id] = InitImage(image_id, extension, fields)
        upload = {"id": image_id, "url": f"{self.url}/s3/bucket", "key": key, "fields": json.dumps(fields)}
        return {"uploadInitImage": upload}

    def s3_post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """S3's presigned POST: every policy field exactly, nothing else, the file part last."""
        if any(name.lower() == "authorization" for name in headers):
            return 400, b"<Error><Code>InvalidArgument</Code><Message>Unsupported Authorization Type</Message></Error>"
        try:
            fields, files = parse_multipart(body, headers.get("Content-Type", ""))
        except ValueError:
            return 400, b"<Error><Code>MalformedPOSTRequest</Code></Error>"
        names = re.findall(rb'Content-Disposition: form-data; name="([^"]+)"', body)
        self.s3_posts.append((fields, [n.decode() for n in names], headers))
        key = (fields.get("key") or [""])[0]
        image = next((i for i in self.init_images.values() if i.fields["key"] == key), None)
        if (
            image is None
            or {k: v for k, (v, *_) in fields.items()} != image.fields
            or any(len(v) > 1 for v in fields.values())
        ):
            return 403, b"<Error><Code>AccessDenied</Code><Message>Invalid according to Policy</Message></Error>"
        if len(files) != 1 or files[0].field != "file" or names[-1] != b"file":
            return (
                400,
                b"<Error><Code>InvalidArgument</Code><Message>POST requires exactly one file upload per request, last</Message></Error>",
            )
        image.data = files[0].data
        return 204, b""


class _LeonardoHandler(JSONHandler):
    fake: FakeLeonardo

    def _authorized(self) -> bool:
        if self.headers.get("authorization") == f"Bearer {self.fake.api_key}":
            return True
        self.send_json(401, hasura_error("Authentication hook unauthorized this request", "access-denied"))
        return False

    def _route(self) -> tuple[str, str | None]:
        path = urlsplit(self.path).path
        match = re.fullmatch(re.escape(API) + r"/(generations|init-image|me)(?:/([^/]+))?", path)
        return (match[1], match[2]) if match else (path, None)

    def do_GET(self) -> None:
        self.read_body()
        path = urlsplit(self.path).path
        if path.startswith("/cdn/"):
            self.send_bytes(200, solid_bytes((40, 160, 90), (8, 8), "jpeg"), "image/jpeg")
            return
        route, ident = self._route()
        if route not in ("generations", "me") or not self._authorized():
            if route not in ("generations", "me"):
                self.send_json(404, hasura_error("no such route", "not-found"))
            return
        if route == "me":
            self.send_json(
                200, {"user_details": [{"user": {"id": "u-1", "username": "fake"}, "apiSubscriptionTokens": 500}]}
            )
        elif ident is not None and self.fake.failing_polls > 0:
            self.fake.failing_polls -= 1
            self.send_json(503, hasura_error("Service unavailable", "unexpected"), {"Retry-After": "0"})
        elif ident is not None:
            self.send_json(200, self.fake.poll(ident))
        else:
            self.send_json(404, hasura_error("no such route", "not-found"))

    def do_DELETE(self) -> None:
        self.read_body()
        route, ident = self._route()
        if ident is None or route not in ("generations", "init-image"):
            self.send_json(404, hasura_error("no such route", "not-found"))
            return
        if not self._authorized():
            return
        with self.fake.lock:
            target = (self.fake.generations if route == "generations" else self.fake.init_images).get(ident)
            if target is not None:
                target.deleted = True
        key = "delete_generations_by_pk" if route == "generations" else "delete_init_image_by_pk"
        self.send_json(200, {key: {"id": ident} if target else None})

    def do_POST(self) -> None:
        body = self.read_body()
        if urlsplit(self.path).path == "/s3/bucket":
            status, text = self.fake.s3_post(body, dict(self.headers.items()))
            self.send_bytes(status, text, "application/xml")
            return
        route, ident = self._route()
        if ident is not None or route not in ("generations", "init-image"):
            self.send_json(404, hasura_error("no such route", "not-found"))
            return
        if not self._authorized():
            return
        try:
            payload = json.loads(body)
        except ValueError:
            self.send_json(400, hasura_error("invalid JSON body", "invalid-json"))
            return
        if route == "init-image":
            extension = payload.get("extension") if isinstance(payload, dict) else None
            if extension not in EXTENSIONS:
                self.send_json(400, hasura_error("Invalid file extension", "unexpected"))
            else:
                self.send_json(200, self.fake.new_init_image(extension))
            return
        problem = self.fake.validate(payload)
        if problem is not None:
            self.send_json(400, hasura_error(problem, "validation-failed"))
            return
        if self.fake.scenario == "malformed":
            self.send_bytes(200, b"<html>gateway</html>", "text/html")
            return
        status, answer, headers = self.fake.create(payload)
        self.send_json(status, answer, headers)
