"""A fake Kie.ai (Seedream v4 tasks, file upload API, credit balance), per API_CONTRACTS.md section 5.

Use as ``with FakeKie() as fake:``; point ``base_url`` and ``upload_base_url`` at ``fake.url`` and
pass ``environ=fake.environ``. Knobs are plain attributes (see ``reset``). Like the real service it
checks the body of every createTask, walks each task through waiting -> queuing -> generating ->
success (``resultJson`` a JSON string), fetches ``image_urls`` itself, serves result URLs that expire,
and answers errors with a business ``code`` in the body: on HTTP 200 (``mirror_status`` False, the
worst case for clients) or with the HTTP status mirroring it.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
import urllib.request
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fakes.images import solid_bytes
from tests.fakes.multipart import parse_multipart
from tests.fakes.server import JSONHandler, RecordedRequest, Recorder, serve_in_thread

TEXT_MODEL, EDIT_MODEL = "bytedance/seedream-v4-text-to-image", "bytedance/seedream-v4-edit"
SIZES = {  # width:height of each image_size
    "square": (1, 1),
    "square_hd": (1, 1),
    "portrait_4_3": (3, 4),
    "portrait_3_2": (2, 3),
    "portrait_16_9": (9, 16),
    "landscape_4_3": (4, 3),
    "landscape_3_2": (3, 2),
    "landscape_16_9": (16, 9),
    "landscape_21_9": (21, 9),
}
LONG_SIDE = {"1K": 1024, "2K": 2048, "4K": 4096}
SCALE = 128  # images are made at 1/128 of the nominal size: 1K square is 8x8
MAX_IMAGE_BYTES = 10 * 1024 * 1024
STATES = ("waiting", "queuing", "generating")


def output_size(image_size: str, resolution: str) -> tuple[int, int]:
    w, h = SIZES[image_size]
    long_side = LONG_SIDE[resolution] // SCALE
    return (long_side, max(1, round(long_side * h / w))) if w >= h else (max(1, round(long_side * w / h)), long_side)


@dataclass
class Task:
    id: str
    model: str
    input: dict[str, Any]
    polls: int = 0
    urls: list[str] = field(default_factory=list)
    succeeded_at: float | None = None


class FakeKie:
    def __init__(self, *, api_key: str = "test-kie-key") -> None:
        self.api_key = api_key
        self.recorder = Recorder()
        self.lock = threading.Lock()
        self.tasks: dict[str, Task] = {}
        self.files: dict[str, tuple[bytes, str]] = {}  # path -> (bytes, mime): uploads and results
        self._stack = ExitStack()
        self.url = ""
        self.reset()

    def reset(self) -> None:
        """Default knobs and nothing recorded (to share one server across tests)."""
        self.mirror_status = False  # HTTP status mirrors the body code, or is always 200
        self.message_key = "msg"  # recordInfo answers with "msg" or "message"
        self.polls_per_state = 1  # polls spent in each of waiting, queuing, generating
        self.fail: tuple[Any, str] | None = None  # (failCode, failMsg): the task ends in state "fail"
        self.images_made: int | None = None  # fewer images than max_images (None: max_images)
        self.result_ttl_s = 5.0  # result URLs answer 403 (expired) after this long
        self.credits: Any = 100
        self.result_errors: deque[int] = deque()  # HTTP statuses for the next result downloads
        self.echo_key = False  # error messages repeat the key the request presented
        # Scripted answers (code, message) for the next calls, one per call: "create", "poll", "upload".
        self.errors: dict[str, deque[tuple[int, str]]] = {"create": deque(), "poll": deque(), "upload": deque()}
        with self.lock:
            self.tasks.clear()
            self.files.clear()
        with self.recorder.lock:
            self.recorder.requests.clear()

    @property
    def requests(self) -> list[RecordedRequest]:
        with self.recorder.lock:
            return list(self.recorder.requests)

    def paths(self, prefix: str) -> list[RecordedRequest]:
        return [r for r in self.requests if urlsplit(r.path).path.startswith(prefix)]

    @property
    def environ(self) -> dict[str, str]:
        return {"KIE_API_KEY": self.api_key}

    def __enter__(self) -> FakeKie:
        handler = type("Handler", (_KieHandler,), {"fake": self, "recorder": self.recorder})
        self.url = self._stack.enter_context(serve_in_thread(handler))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    # -- behaviour ------------------------------------------------------------------------------

    def validate(self, body: Any) -> str | None:
        """The createTask checks: known model, input fields and their enums, edit's image_urls."""
        if not isinstance(body, dict) or body.get("model") not in (TEXT_MODEL, EDIT_MODEL):
            return f"model is not supported: {body.get('model') if isinstance(body, dict) else body!r}"
        data = body.get("input")
        if not isinstance(data, dict):
            return "input is required"
        if not isinstance(data.get("prompt"), str) or not data["prompt"].strip():
            return "input.prompt is required"
        if data.get("image_size", "square_hd") not in SIZES:
            return f"input.image_size must be one of {', '.join(SIZES)}"
        if data.get("image_resolution", "1K") not in LONG_SIDE:
            return "input.image_resolution must be one of 1K, 2K, 4K"
        images = data.get("max_images", 1)
        if not isinstance(images, int) or isinstance(images, bool) or not 1 <= images <= 6:
            return "input.max_images must be an integer from 1 to 6"
        if "seed" in data and (not isinstance(data["seed"], int) or isinstance(data["seed"], bool)):
            return "input.seed must be an integer"
        if "nsfw_checker" in data and not isinstance(data["nsfw_checker"], bool):
            return "input.nsfw_checker must be a boolean"
        if body["model"] == EDIT_MODEL:
            urls = data.get("image_urls")
            if not isinstance(urls, list) or not 1 <= len(urls) <= 10:
                return "input.image_urls must list 1 to 10 image URLs"
            for url in urls:
                if problem := self.check_image_url(url):
                    return problem
        return None

    def check_image_url(self, url: Any) -> str | None:
        """Kie fetches each image URL itself: it must answer a JPEG, PNG or WebP of at most 10 MB."""
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return f"image_urls must be public URLs: {str(url)[:80]!r}"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:  # tests serve only 127.0.0.1
                data = answer.read(MAX_IMAGE_BYTES + 1)
        except OSError:
            return f"image could not be downloaded: {url}"
        if len(data) > MAX_IMAGE_BYTES:
            return f"image is larger than 10MB: {url}"
        if not data.startswith((b"\x89PNG", b"\xff\xd8\xff")) and data[8:12] != b"WEBP":
            return f"image format is not supported (jpeg, png, webp): {url}"
        return None

    def create(self, body: dict[str, Any]) -> str:
        with self.lock:
            task = Task(f"task_seedream_{len(self.tasks) + 1:04d}", body["model"], body["input"])
            self.tasks[task.id] = task
        return task.id

    def poll(self, task_id: str) -> dict[str, Any] | None:
        """The recordInfo ``data`` after one more poll, or None for an unknown task."""
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None:
                return None
            task.polls += 1
            step = (task.polls - 1) // self.polls_per_state
            record: dict[str, Any] = {"taskId": task.id, "model": task.model, "param": json.dumps(task.input)}
            record |= {"resultJson": "", "failCode": None, "failMsg": None, "createTime": 0, "completeTime": None}
            if step < len(STATES):
                return record | {"state": STATES[step]}
            if self.fail is not None:
                return record | {"state": "fail", "failCode": self.fail[0], "failMsg": self.fail[1]}
            if not task.urls:
                self._make_results(task)
            return record | {"state": "success", "resultJson": json.dumps({"resultUrls": task.urls})}

    def _make_results(self, task: Task) -> None:
        size = output_size(task.input.get("image_size", "square_hd"), task.input.get("image_resolution", "1K"))
        count = task.input.get("max_images", 1) if self.images_made is None else self.images_made
        for n in range(count):
            path = f"/files/results/{task.id}/{n}.png"
            self.files[path] = (solid_bytes((40 * n % 255, 120, 200), size, "png"), "image/png")
            task.urls.append(self.url + path)
        task.succeeded_at = time.monotonic()

    def result_expired(self, path: str) -> bool:
        task_id = path.split("/")[3] if path.startswith("/files/results/") else ""
        with self.lock:
            task = self.tasks.get(task_id)
            done = task.succeeded_at if task else None
        return done is not None and time.monotonic() - done > self.result_ttl_s

    def store_upload(self, data: bytes, mime: str, upload_path: str, file_name: str | None) -> dict[str, Any]:
        name = file_name or f"upload-{len(self.files)}.{mime.rpartition('/')[2]}"
        path = f"/files/uploads/{upload_path}/{name}"
        with self.lock:
            self.files[path] = (data, mime)  # the same name overwrites, as Kie's does
        return {
            "fileName": name,
            "filePath": f"{upload_path}/{name}",
            "downloadUrl": self.url + path,
            "fileSize": len(data),
            "mimeType": mime,
            "uploadedAt": "2026-11-30T00:00:00.000Z",
        }


def decode_upload(value: Any) -> tuple[bytes, str] | None:
    """base64Data: a data URI or bare base64; the mime from the URI or the bytes."""
    if not isinstance(value, str) or not value:
        return None
    mime = ""
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        mime = header[5:].partition(";")[0]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data, mime or ("image/png" if data.startswith(b"\x89PNG") else "application/octet-stream")


class _KieHandler(JSONHandler):
    fake: FakeKie

    def answer(self, code: int, message: str, data: Any = None, *, key: str = "msg", upload: bool = False) -> None:
        body: dict[str, Any] = {"code": code, key: message, "data": data}
        if upload:
            body["success"] = code == 200
        status = code if self.fake.mirror_status and code != 200 else 200
        try:
            self.send_json(status, body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up
            pass

    def _authorized(self) -> bool:
        presented = self.headers.get("Authorization", "")
        if presented == f"Bearer {self.fake.api_key}":
            return True
        said = f" (key {presented.removeprefix('Bearer ')})" if self.fake.echo_key else ""
        self.answer(401, f"You do not have access permissions{said}")
        return False

    def _scripted(self, kind: str, upload: bool = False) -> bool:
        queue = self.fake.errors[kind]
        if not queue:
            return False
        code, message = queue.popleft()
        if self.fake.echo_key:
            message += f" {self.headers.get('Authorization', '')}"
        self.answer(code, message, upload=upload)
        return True

    def do_GET(self) -> None:
        self.read_body()
        url = urlsplit(self.path)
        fake = self.fake
        if url.path.startswith("/files/"):
            with fake.lock:
                stored = fake.files.get(url.path)
            if url.path.startswith("/files/results/") and fake.result_errors:
                self.send_bytes(fake.result_errors.popleft(), b"<Error>InternalError</Error>", "application/xml")
            elif stored is None or fake.result_expired(url.path):
                self.send_bytes(403, b"<Error><Code>AccessDenied</Code>Request has expired</Error>", "application/xml")
            else:
                self.send_bytes(200, stored[0], stored[1])
            return
        if not self._authorized():
            return
        if url.path == "/api/v1/chat/credit":
            self.answer(200, "success", fake.credits)
        elif url.path == "/api/v1/jobs/recordInfo":
            if self._scripted("poll"):
                return
            record = fake.poll((parse_qs(url.query).get("taskId") or [""])[0])
            if record is None:
                self.answer(422, "recordInfo is null", key=fake.message_key)
            else:
                self.answer(200, "success", record, key=fake.message_key)
        else:
            self.answer(404, "Not Found")

    def do_POST(self) -> None:
        raw = self.read_body()
        path = urlsplit(self.path).path
        if not self._authorized():
            return
        if path == "/api/v1/jobs/createTask":
            self._create(raw)
        elif path in ("/api/file-base64-upload", "/api/file-stream-upload"):
            self._upload(path, raw)
        else:
            self.answer(404, "Not Found")

    def _create(self, raw: bytes) -> None:
        if self._scripted("create"):
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self.answer(422, "request body is not JSON")
            return
        problem = self.fake.validate(body)
        if problem is not None:
            self.answer(422, problem)
            return
        self.answer(200, "success", {"taskId": self.fake.create(body)})

    def _upload(self, path: str, raw: bytes) -> None:
        if self._scripted("upload", upload=True):
            return
        if path.endswith("base64-upload"):
            try:
                body = json.loads(raw)
            except ValueError:
                body = {}
            fields = body if isinstance(body, dict) else {}
            decoded = decode_upload(fields.get("base64Data"))
        else:
            try:
                form, files = parse_multipart(raw, self.headers.get("Content-Type", ""))
            except ValueError:
                form, files = {}, []
            fields = {name: values[0] for name, values in form.items()}
            decoded = (files[0].data, files[0].content_type) if files and files[0].field == "file" else None
        upload_path = fields.get("uploadPath")
        path_ok = isinstance(upload_path, str) and upload_path != "" and upload_path.strip("/") == upload_path
        if decoded is None or not path_ok:
            self.answer(400, "base64Data/file and uploadPath (no leading or trailing slash) are required", upload=True)
            return
        data = self.fake.store_upload(*decoded, upload_path, fields.get("fileName"))
        self.answer(200, "File uploaded successfully", data, upload=True)
