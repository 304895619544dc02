"""A fake Runware REST API (``POST /v1`` with a JSON array of tasks), per API_CONTRACTS.md section 7.

Tasks: ``authentication``, ``imageUpload``, ``imageInference`` (sync, or async with
``getResponse`` polling) and ``getResponse``; ``X-Runware-Dry-Run: 1`` validates without
running. Errors are per task (``{"errors": [{code, message, parameter, taskType, taskUUID}]}``),
mixed with successes in a 200 when some tasks succeed. Result images are encoded in the
requested ``outputFormat`` and returned as ``outputType`` asks (URLs served under ``/images/``).
"""

from __future__ import annotations

import base64
import json
import re
import threading
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from tests.fakes.images import solid_bytes
from tests.fakes.server import JSONHandler, RecordedRequest, Recorder, serve_in_thread

Scenario = Literal[
    "ok",
    "rate_limited",  # 429 for every call (Retry-After)
    "no_credits",  # 402 insufficientCredits
    "task_error",  # 200; the imageInference task fails on its own (per-task error), uploads succeed
    "nsfw",  # results carry NSFWContent true when checkNSFW was set
    "echo_key",  # 500 whose message repeats the key it was sent (after ``echo_padding`` x's)
    "internal",  # 500 internalError
    "slow",  # answers only after ``delay_s`` (or when the fake shuts down)
    "malformed",  # 200 with a body that is not JSON
    "async_error",  # async tasks end in status "error"
]
AIR = re.compile(r"^[A-Za-z0-9_.-]+:[A-Za-z0-9_.-]+@[A-Za-z0-9_.-]+$")
OUTPUT_TYPES = ("URL", "base64Data", "dataURI")
FORMATS = {"PNG": ("png", "image/png"), "JPG": ("jpeg", "image/jpeg"), "WEBP": ("webp", "image/webp")}
INVALID_KEY = {
    "code": "invalidApiKey",
    "message": "Invalid API key. Get one at https://my.runware.ai/signup",
    "parameter": "apiKey",
    "taskType": "authentication",
}


class TaskError(Exception):
    def __init__(self, code: str, message: str, parameter: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.parameter, self.status = code, message, parameter, status


@dataclass
class AsyncTask:
    task: dict[str, Any]
    polls: int = 0
    results: list[dict[str, Any]] = field(default_factory=list)


class FakeRunware:
    def __init__(self, *, api_key: str = "test-runware-key") -> None:
        self.api_key = api_key
        self.recorder = Recorder()
        self.lock = threading.Lock()
        self.released = threading.Event()
        self._stack = ExitStack()
        self.url = ""
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.scenario: Scenario = "ok"
            self.size_multiple = 64
            self.processing_polls = 1
            self.echo_padding = 0
            self.failing_polls = 0  # the next getResponse calls answer 503 (then it counts down)
            self.delay_s = 5.0
            self.uploads: dict[str, bytes] = {}
            self.inferences: list[dict[str, Any]] = []  # tasks that ran (not dry runs)
            self.async_tasks: dict[str, AsyncTask] = {}
            self.images: dict[str, bytes] = {}
        with self.recorder.lock:
            self.recorder.requests.clear()

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.recorder.requests

    def tasks(self, task_type: str) -> list[dict[str, Any]]:
        """Every task of ``task_type`` received (from every call), in order."""
        found = []
        for request in self.requests:
            if urlsplit(request.path).path == "/v1":
                try:
                    body = request.json()
                except ValueError:
                    continue
                found += [t for t in body if isinstance(t, dict) and t.get("taskType") == task_type]
        return found

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def environ(self) -> dict[str, str]:
        return {"RUNWARE_API_KEY": self.api_key}

    def __enter__(self) -> FakeRunware:
        handler = type("Handler", (_RunwareHandler,), {"fake": self, "recorder": self.recorder})
        self.url = self._stack.enter_context(serve_in_thread(handler))
        self._stack.callback(self.released.set)  # runs first: frees handlers stuck in "slow"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    # -- one call -------------------------------------------------------------------------------------

    def handle(self, body: bytes, headers: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        try:
            tasks = json.loads(body)
        except ValueError:
            return 400, {"errors": [{"code": "invalidJSON", "message": "Invalid JSON body"}]}, {}
        if not isinstance(tasks, list):
            return 400, {"errors": [{"code": "invalidRequest", "message": "The request body must be an array of tasks"}]}, {}  # fmt: skip
        bearer = headers.get("authorization")
        if tasks and isinstance(tasks[0], dict) and tasks[0].get("taskType") == "authentication":
            if bearer is not None:  # the two ways are not to be mixed
                return 400, {"errors": [{**INVALID_KEY, "message": "Use one way to authenticate"}]}, {}
            key_ok = tasks.pop(0).get("apiKey") == self.api_key
        else:
            key_ok = bearer == f"Bearer {self.api_key}"
        if not key_ok:
            return 401, {"errors": [INVALID_KEY]}, {}
        scenario = self.scenario
        if scenario == "rate_limited":
            return (
                429,
                {"errors": [{"code": "rateLimitExceeded", "message": "Too many requests"}]},
                {"Retry-After": "3"},
            )
        if scenario == "no_credits":
            return 402, {"errors": [{"code": "insufficientCredits", "message": "Insufficient credits"}]}, {}
        if scenario == "echo_key":
            message = "x" * self.echo_padding + f" failed for {self.api_key}"
            return 500, {"errors": [{"code": "internalError", "message": message}]}, {}
        if scenario == "internal":
            return 500, {"errors": [{"code": "internalError", "message": "Internal error"}]}, {}
        if scenario == "slow":
            self.released.wait(self.delay_s)
        if self.failing_polls > 0 and any(isinstance(t, dict) and t.get("taskType") == "getResponse" for t in tasks):
            self.failing_polls -= 1
            return 503, {"errors": [{"code": "serviceUnavailable", "message": "Service unavailable"}]}, {}
        dry_run = headers.get("x-runware-dry-run") == "1"
        data: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for task in tasks:
            task_uuid = task.get("taskUUID") if isinstance(task, dict) else None
            task_type = task.get("taskType") if isinstance(task, dict) else None
            try:
                if not isinstance(task_uuid, str) or not task_uuid:
                    raise TaskError("missingTaskUUID", "taskUUID is required", "taskUUID")
                data += self.run(task, dry_run=dry_run)
            except TaskError as exc:
                error = {"code": exc.code, "message": exc.message, "taskType": task_type, "taskUUID": task_uuid}
                errors.append(error | ({"parameter": exc.parameter} if exc.parameter else {}))
                status = exc.status
        if errors and not data:
            return status, {"errors": errors}, {}
        return 200, {"data": data, **({"errors": errors} if errors else {})}, {}

    def run(self, task: dict[str, Any], *, dry_run: bool) -> list[dict[str, Any]]:
        kind = task.get("taskType")
        if kind == "imageUpload":
            return [self.upload(task)]
        if kind == "getResponse":
            return self.get_response(task["taskUUID"])
        if kind != "imageInference":
            raise TaskError("invalidTaskType", f"Unknown taskType {kind!r}", "taskType")
        self.validate(task)
        if dry_run:
            return [{"taskType": kind, "taskUUID": task["taskUUID"], "cost": 0.0013}]
        if self.scenario == "task_error":
            raise TaskError("invalidModel", "The model could not run this task", "model")
        with self.lock:
            self.inferences.append(task)
        results = [self.result(task, n) for n in range(task.get("numberResults", 1))]
        if task.get("deliveryMethod") == "async":
            with self.lock:
                self.async_tasks[task["taskUUID"]] = AsyncTask(task, results=results)
            return [{"taskType": kind, "taskUUID": task["taskUUID"]}]
        return results

    def upload(self, task: dict[str, Any]) -> dict[str, Any]:
        image = task.get("image")
        if not isinstance(image, str) or not image:
            raise TaskError("invalidImage", "image is required", "image")
        payload = image.partition(",")[2] if image.startswith("data:") else image
        try:
            data = base64.b64decode(payload, validate=True)
        except ValueError:
            raise TaskError("invalidImage", "image is not a data URI, base64 or URL", "image") from None
        image_uuid = str(uuid.uuid4())
        with self.lock:
            self.uploads[image_uuid] = data
        url = f"{self.url}/images/{image_uuid}.png"
        return {"taskType": "imageUpload", "taskUUID": task["taskUUID"], "imageUUID": image_uuid, "imageURL": url}

    def validate(self, task: dict[str, Any]) -> None:
        def need(ok: bool, parameter: str, message: str) -> None:
            if not ok:
                raise TaskError(f"invalid{parameter[0].upper()}{parameter[1:]}", message, parameter)

        need(isinstance(task.get("model"), str) and bool(AIR.match(task["model"])), "model", "model must be an AIR id")
        prompt = task.get("positivePrompt")
        need(isinstance(prompt, str) and bool(prompt.strip()), "positivePrompt", "positivePrompt is required")
        for side in ("width", "height"):
            value = task.get(side)
            need(
                isinstance(value, int) and 128 <= value <= 2048 and value % self.size_multiple == 0,
                side,
                f"{side} must be a multiple of {self.size_multiple} between 128 and 2048",
            )
        count = task.get("numberResults", 1)
        need(isinstance(count, int) and 1 <= count <= 20, "numberResults", "numberResults must be 1..20")
        output_type = task.get("outputType", "URL")
        need(output_type in OUTPUT_TYPES, "outputType", f"outputType must be one of {OUTPUT_TYPES}")
        need(task.get("outputFormat", "JPG") in FORMATS, "outputFormat", "outputFormat must be JPG, PNG or WEBP")
        need(task.get("deliveryMethod", "sync") in ("sync", "async"), "deliveryMethod", "sync or async")
        steps = task.get("steps", 20)
        need(isinstance(steps, int) and 1 <= steps <= 100, "steps", "steps must be 1..100")
        cfg = task.get("CFGScale", 7)
        need(isinstance(cfg, int | float) and 0 <= cfg <= 50, "CFGScale", "CFGScale must be 0..50")
        strength = task.get("strength", 0.8)
        need(isinstance(strength, int | float) and 0 <= strength <= 1, "strength", "strength must be 0..1")
        for image in ([task["seedImage"]] if "seedImage" in task else []) + list(task.get("referenceImages", [])):
            need(
                self.known_image(image), "seedImage", "images must be an uploaded imageUUID, a URL, base64 or data URI"
            )
        for lora in task.get("lora", []):
            need(
                isinstance(lora, dict) and isinstance(lora.get("model"), str) and bool(AIR.match(lora["model"])),
                "lora",
                "each lora needs a model AIR id",
            )

    def known_image(self, image: Any) -> bool:
        if not isinstance(image, str):
            return False
        if image in self.uploads or image.startswith(("http://", "https://", "data:image/")):
            return True
        try:
            return bool(base64.b64decode(image, validate=True))
        except ValueError:
            return False

    def result(self, task: dict[str, Any], number: int) -> dict[str, Any]:
        fmt, mime = FORMATS[task.get("outputFormat", "JPG")]
        data = solid_bytes((120, 40 + number, 200), (8, 8), fmt)
        image_uuid = str(uuid.uuid4())
        item: dict[str, Any] = {"taskType": "imageInference", "taskUUID": task["taskUUID"], "imageUUID": image_uuid}
        output_type = task.get("outputType", "URL")
        if output_type == "URL":
            with self.lock:
                self.images[image_uuid] = data
            item["imageURL"] = f"{self.url}/images/{image_uuid}.{fmt}"
        elif output_type == "base64Data":
            item["imageBase64Data"] = base64.b64encode(data).decode()
        else:
            item["imageDataURI"] = f"data:{mime};base64,{base64.b64encode(data).decode()}"
        item["seed"] = task.get("seed", 1000 + number)
        if task.get("checkNSFW"):
            item["NSFWContent"] = self.scenario == "nsfw"
        return item

    def get_response(self, task_uuid: str) -> list[dict[str, Any]]:
        with self.lock:
            pending = self.async_tasks.get(task_uuid)
            if pending is None:
                raise TaskError("taskNotFound", f"No task with taskUUID {task_uuid}", "taskUUID", status=404)
            pending.polls += 1
            processing = pending.polls <= self.processing_polls
        base = {"taskType": "imageInference", "taskUUID": task_uuid}
        if processing:
            return [{**base, "status": "processing"}]
        if self.scenario == "async_error":
            return [{**base, "status": "error", "code": "inferenceFailed", "message": "The provider failed"}]
        return [{**result, "status": "success"} for result in pending.results]


class _RunwareHandler(JSONHandler):
    fake: FakeRunware

    def do_GET(self) -> None:
        self.read_body()
        match = re.fullmatch(r"/images/([0-9a-f-]+)\.\w+", urlsplit(self.path).path)
        data = self.fake.images.get(match[1]) if match else None
        if data is None:
            self.send_bytes(404, b"not found", "text/plain")
        else:
            self.send_bytes(200, data, "image/png")

    def do_POST(self) -> None:
        body = self.read_body()
        if urlsplit(self.path).path != "/v1":
            self.send_json(404, {"errors": [{"code": "notFound", "message": "Not found"}]})
            return
        if self.fake.scenario == "malformed":
            self.send_bytes(200, b"<html>bad gateway</html>", "text/html")
            return
        headers = {key.lower(): value for key, value in self.headers.items()}
        status, payload, extra = self.fake.handle(body, headers)
        try:
            self.send_json(status, payload, extra)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
            pass
