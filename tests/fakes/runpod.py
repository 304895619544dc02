"""A fake RunPod serverless endpoint running worker-comfyui 5.x (API_CONTRACTS.md section 10).

``with FakeRunPod() as fake:``; point ``base_url`` at ``fake.url`` and ``environ`` at
``fake.environ``. Each status poll advances a job one step along ``fake.statuses`` (then the
terminal ``fake.outcome``). Knobs are plain attributes; ``fake.jobs`` records what was sent.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

from tests.fakes.images import solid_bytes
from tests.fakes.server import JSONHandler, RecordedRequest, Recorder, serve_in_thread

Outcome = Literal["COMPLETED", "FAILED", "TIMED_OUT", "CANCELLED"]
OutputKind = Literal["base64", "s3_url", "no_images", "legacy", "garbage"]
ROUTE = re.compile(r"^/(?P<endpoint>[^/]+)/(?P<call>runsync|run|status|cancel|health)(?:/(?P<job>[^/?]+))?/?$")


@dataclass
class FakeJob:
    id: str
    input: dict[str, Any]
    polls: int = 0
    cancelled: bool = False
    created: float = field(default_factory=time.perf_counter)
    history: list[str] = field(default_factory=list)


class FakeRunPod:
    def __init__(self, *, api_key: str = "rp-test-key", endpoint_id: str = "abc123xyz") -> None:
        self.api_key = api_key
        self.endpoint_id = endpoint_id
        self.environ = {"RUNPOD_API_KEY": api_key}
        self.recorder = Recorder()
        self.lock = threading.Lock()
        self.jobs: dict[str, FakeJob] = {}
        self.cancels: list[str] = []
        self.statuses: list[str] = ["IN_QUEUE", "IN_PROGRESS"]
        self.outcome: Outcome = "COMPLETED"
        self.output: OutputKind = "base64"
        self.error = json.dumps(
            {
                "error_type": "RuntimeError",
                "error_message": "CUDA error: out of memory",
                "error_traceback": "Traceback SECRET_TRACE",
            }
        )
        self.runsync_final = True  # False: /runsync answers IN_PROGRESS and the client must poll
        self.rate_limited = False
        self.failure_details: list[str] | None = None
        self.echo_key = False  # a 401 that quotes the Authorization header it was sent
        self.submit_error: tuple[int, str] | None = None  # answer /run and /runsync with this
        self.malformed = False  # /status answers with HTML
        self.complete_after_s: float | None = None  # set: jobs finish by time, not by poll count
        self.limits = {"run": 10_000_000, "runsync": 20_000_000}
        self.delay_ms, self.execution_ms = 1234, 5678
        self.color = (30, 120, 240)
        self.files: dict[str, bytes] = {}
        self._stack = ExitStack()
        self.url = ""

    def __enter__(self) -> FakeRunPod:
        self.url = self._stack.enter_context(serve_in_thread(self._handler()))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.recorder.requests

    def image(self) -> bytes:
        return solid_bytes(self.color, (48, 32), "png")

    def job_object(self, job: FakeJob, status: str) -> dict[str, Any]:
        body: dict[str, Any] = {"id": job.id, "status": status}
        if status in ("IN_PROGRESS", "COMPLETED", "FAILED"):
            body |= {"delayTime": self.delay_ms, "workerId": "worker-1"}
        if status == "COMPLETED":
            body |= {"executionTime": self.execution_ms, "output": self._output()}
        if status == "FAILED":
            body |= {"executionTime": self.execution_ms, "error": self._failure(job)}
            if self.failure_details:  # worker-comfyui's {"error": "Job processing failed", "details": [...]}
                body |= {"error": "Job processing failed", "output": {"details": self.failure_details}}
        return body

    def _failure(self, job: FakeJob) -> str:
        if "workflow" not in job.input:
            return "Missing 'workflow' parameter"
        return self.error

    def _output(self) -> dict[str, Any]:
        data = self.image()
        if self.output == "no_images":
            return {"status": "success_no_images", "images": []}
        if self.output == "legacy":
            return {"message": base64.b64encode(data).decode(), "status": "success"}
        if self.output == "garbage":
            return {"images": [{"filename": "x.png", "type": "base64", "data": "%%% not base64"}]}
        if self.output == "s3_url":
            name = f"{uuid.uuid4().hex}.png"
            self.files[name] = data
            return {
                "images": [{"filename": "ComfyUI_00001_.png", "type": "s3_url", "data": f"{self.url}/files/{name}"}]
            }
        return {
            "images": [{"filename": "ComfyUI_00001_.png", "type": "base64", "data": base64.b64encode(data).decode()}]
        }

    def advance(self, job: FakeJob) -> str:
        if job.cancelled:
            return "CANCELLED"
        job.polls += 1
        if self.complete_after_s is not None:  # by time, as a real endpoint (benchmarks)
            age = time.perf_counter() - job.created
            status = (
                self.outcome
                if age >= self.complete_after_s
                else "IN_QUEUE"
                if age < self.complete_after_s / 5
                else "IN_PROGRESS"
            )
        elif job.polls <= len(self.statuses):
            status = self.statuses[job.polls - 1]
        elif "workflow" not in job.input:
            status = "FAILED"
        else:
            status = self.outcome
        job.history.append(status)
        return status

    def _handler(self) -> type[JSONHandler]:
        fake = self

        class Handler(JSONHandler):
            recorder = fake.recorder

            def do_GET(self) -> None:
                self.dispatch("GET")

            def do_POST(self) -> None:
                self.dispatch("POST")

            def dispatch(self, method: str) -> None:
                body = self.read_body()
                if self.path.startswith("/files/"):
                    data = fake.files.get(self.path[len("/files/") :])
                    self.send_bytes(200 if data else 404, data or b"", "image/png")
                    return
                if self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    presented = self.headers.get("Authorization", "")
                    self.send_json(401, {"error": f"Unauthorized: {presented}" if fake.echo_key else "Unauthorized"})
                    return
                match = ROUTE.match(self.path)
                if match is None or match["endpoint"] != fake.endpoint_id:
                    self.send_json(404, {"error": "endpoint not found"})
                    return
                if fake.rate_limited:
                    self.send_json(429, {"error": "Too many requests"}, {"Retry-After": "3"})
                    return
                call = match["call"]
                if call in ("run", "runsync") and method == "POST":
                    self.submit(call, body)
                elif call == "status" and method == "GET" and fake.malformed:
                    self.send_bytes(200, b"<html>upstream hiccup</html>", "text/html")
                elif call == "status" and method == "GET":
                    with fake.lock:
                        job = fake.jobs.get(match["job"] or "")
                        status = fake.advance(job) if job else None
                    if job is None or status is None:
                        self.send_json(404, {"error": "job not found"})
                    else:
                        self.send_json(200, fake.job_object(job, status))
                elif call == "cancel" and method == "POST":
                    with fake.lock:
                        job = fake.jobs.get(match["job"] or "")
                        if job:
                            job.cancelled = True
                            fake.cancels.append(job.id)
                    self.send_json(200 if job else 404, {"id": match["job"], "status": "CANCELLED"})
                elif call == "health":
                    self.send_json(
                        200,
                        {
                            "jobs": {"completed": 1, "failed": 0, "inProgress": 0, "inQueue": 0},
                            "workers": {"idle": 1, "running": 0},
                        },
                    )
                else:
                    self.send_json(405, {"error": "method not allowed"})

            def submit(self, call: str, body: bytes) -> None:
                if fake.submit_error is not None:
                    status, text = fake.submit_error
                    self.send_json(status, {"error": text})
                    return
                if len(body) > fake.limits[call]:
                    self.send_json(400, {"error": f"payload too large: {len(body)} bytes"})
                    return
                try:
                    payload = json.loads(body)["input"]
                except (ValueError, KeyError, TypeError):
                    self.send_json(400, {"error": "input is required"})
                    return
                job = FakeJob(f"{uuid.uuid4()}-u1", payload)
                with fake.lock:
                    fake.jobs[job.id] = job
                    if call == "runsync" and fake.runsync_final:
                        job.polls = len(fake.statuses)
                        status = fake.advance(job)
                    elif call == "runsync":
                        status = "IN_PROGRESS"
                    else:
                        status = "IN_QUEUE"
                if call == "run":
                    self.send_json(200, {"id": job.id, "status": status})
                else:
                    self.send_json(200, fake.job_object(job, status))

        return Handler
