"""A fake fal.ai (contract section 1.7): queue, storage and CDN on one 127.0.0.1 origin, the
synchronous run API on a second one (both take ``POST /{endpoint}``, as fal's two hosts do).

``serve_fal(scenario)`` starts it; ``fake.hosts()`` is the generator config that points at it.
Scenario knobs script statuses, errors, outputs and hangs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

from tests.fakes.fal_rules import check_arguments, unknown_fields
from tests.fakes.fal_state import (
    DEFAULT_KEY,
    DEFAULT_STATUSES,
    HANG_LIMIT_S,
    FakeError,
    FakeFal,
    FakeJob,
    FalScenario,
    make_image,
)
from tests.fakes.server import JSONHandler, serve_in_thread

__all__ = [
    "DEFAULT_KEY",
    "DEFAULT_STATUSES",
    "FakeError",
    "FakeFal",
    "FakeJob",
    "FalScenario",
    "serve_fal",
]

CDN_TOKEN = "fake-cdn-token"
REQUEST_PATH = re.compile(r"^/(?P<owner>[^/]+)/(?P<app>[^/]+)/requests/(?P<id>[^/]+)(?P<tail>/status|/cancel)?$")


class FalHandler(JSONHandler):
    fake: ClassVar[FakeFal]
    role: ClassVar[str] = "queue"  # or "run": POST /{endpoint} answers with the output itself
    disable_nagle_algorithm = True  # headers and body go out in two writes: Nagle would add ~40 ms each

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        body = self.read_body()
        url = urlsplit(self.path)
        path, method = url.path, self.command
        try:
            if method == "POST" and path == "/storage/auth/token":
                self._token()
            elif method == "POST" and path == "/files/upload":
                self._cdn_upload(body)
            elif method == "POST" and path == "/storage/upload/initiate":
                self._initiate(body)
            elif method == "PUT" and path.startswith("/uploads/"):
                self.fake.store(path.removeprefix("/uploads/"), body, self.headers.get("Content-Type", ""))
                self.send_json(200, {})
            elif method == "GET" and path.startswith("/files/"):
                self._file(path.removeprefix("/files/"))
            elif (match := REQUEST_PATH.match(path)) is not None:
                self._queue_request(method, match["id"], match["tail"] or "", parse_qs(url.query))
            elif method == "POST" and self.role == "run":
                self._run(path.strip("/"), body)
            elif method == "POST":
                self._submit(path.strip("/"), body)
            else:
                self.send_json(404, {"detail": f"no route for {method} {path}"})
        except (BrokenPipeError, ConnectionResetError):  # the client went away (cancelled)
            pass
        except Exception as exc:  # a bug in the fake: fail the test at teardown, not with a hang
            self.fake.crashes.append(exc)
            self.send_json(500, {"detail": f"fake fal crashed: {exc!r}", "error_type": "fake_server_bug"})

    # -- helpers -------------------------------------------------------------------------------

    def _authorized(self, expected: str) -> bool:
        if self.headers.get("Authorization") == expected:
            return True
        self.send_json(401, {"detail": "No user found for Key ID and Secret"})
        return False

    def _injected(self, stage: str) -> bool:
        error = self.fake.take_error(stage)
        if error is None:
            return False
        if isinstance(error.body, bytes):
            self.send_bytes(error.status, error.body, "text/plain", error.headers)
        else:
            self.send_json(error.status, error.body if error.body is not None else {}, error.headers)
        return True

    def _job(self, request_id: str) -> FakeJob | None:
        with self.fake.lock:
            job = self.fake.jobs.get(request_id)
        if job is None:
            self.send_json(404, {"detail": f"Request {request_id} not found"})
        return job

    # -- storage and CDN -----------------------------------------------------------------------

    def _token(self) -> None:
        if not self._authorized(f"Key {self.fake.scenario.key}") or self._injected("token"):
            return
        expires = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        token = {"token": CDN_TOKEN, "token_type": "Bearer", "base_url": self.fake.base_url, "expires_at": expires}
        self.send_json(200, token)

    def _cdn_upload(self, body: bytes) -> None:
        if not self._authorized(f"Bearer {CDN_TOKEN}") or self._injected("cdn_upload"):
            return
        name = f"upload-{self.fake.next_id()}"
        self.send_json(200, {"access_url": self.fake.store(name, body, self.headers.get("Content-Type", ""))})

    def _initiate(self, body: bytes) -> None:
        if not self._authorized(f"Key {self.fake.scenario.key}") or self._injected("storage_initiate"):
            return
        name = f"gcs-{self.fake.next_id()}"
        self.send_json(
            200,
            {"upload_url": f"{self.fake.base_url}/uploads/{name}", "file_url": f"{self.fake.base_url}/files/{name}"},
        )

    def _file(self, name: str) -> None:
        with self.fake.lock:
            stored = self.fake.files.get(name)
        if stored is None:
            self.send_json(404, {"detail": "file not found"})
        else:
            self.send_bytes(200, stored[0], stored[1] or "application/octet-stream")

    # -- queue ---------------------------------------------------------------------------------

    def _accept(self, endpoint: str, body: bytes, stage: str) -> FakeJob | None:
        """Check key, injected errors and arguments; the new job, or None once an error is sent."""
        scenario = self.fake.scenario
        if not self._authorized(f"Key {scenario.key}") or self._injected(stage):
            return None
        try:
            arguments = json.loads(body or b"{}")
        except ValueError:
            self.send_json(400, {"detail": "body is not JSON", "error_type": "bad_request"})
            return None
        problems = check_arguments(endpoint, arguments, known_files=set(self.fake.files))
        if problems:
            self.send_json(422, {"detail": problems})
            return None
        dropped = unknown_fields(endpoint, arguments)
        if dropped:
            with self.fake.lock:
                self.fake.dropped.append((endpoint, dropped))
        job = FakeJob(self.fake.next_id(), endpoint, arguments)
        with self.fake.lock:
            self.fake.jobs[job.request_id] = job
        return job

    def _run(self, endpoint: str, body: bytes) -> None:
        job = self._accept(endpoint, body, "run")
        if job is not None:
            job.completed = True
            self._result(job)

    def _submit(self, endpoint: str, body: bytes) -> None:
        scenario = self.fake.scenario
        self.fake.submitting.set()
        if scenario.submit_delay_s:
            self.fake.stopping.wait(scenario.submit_delay_s)
        job = self._accept(endpoint, body, "submit")
        if job is None:
            return
        owner, app = endpoint.split("/")[:2]  # the subpath is dropped, as fal does
        base = f"{self.fake.base_url}/{owner}/{app}/requests/{job.request_id}"
        first = scenario.statuses[0]
        self.send_json(
            200,
            {
                "status": "IN_QUEUE",
                "request_id": job.request_id,
                "response_url": base,
                "status_url": f"{base}/status",
                "cancel_url": f"{base}/cancel",
                "queue_position": first[1] if first[0] == "IN_QUEUE" else 0,
            },
        )

    def _queue_request(self, method: str, request_id: str, tail: str, query: dict[str, list[str]]) -> None:
        if not self._authorized(f"Key {self.fake.scenario.key}"):
            return
        job = self._job(request_id)
        if job is None:
            return
        if method == "GET" and tail == "/status":
            self._status(job, with_logs=query.get("logs", ["false"])[0] == "true")
        elif method == "GET" and tail == "":
            self._result(job)
        elif method == "PUT" and tail == "/cancel":
            if self._injected("cancel"):
                return
            if job.completed:
                self.send_json(400, {"status": "ALREADY_COMPLETED"})
            else:
                job.cancelled.set()
                job.unblock.set()
                self.send_json(202, {"status": "CANCELLATION_REQUESTED"})
        else:
            self.send_json(405, {"detail": f"{method} not allowed here"})

    def _status(self, job: FakeJob, *, with_logs: bool) -> None:
        scenario = self.fake.scenario
        with self.fake.lock:
            poll = job.polls
            job.polls += 1
        if scenario.hang_at_poll == poll:
            self.fake.hanging.set()
            job.unblock.wait(HANG_LIMIT_S)
        if self._injected("status"):
            return
        state, position = scenario.statuses[min(poll, len(scenario.statuses) - 1)]
        # fal sends every log line so far on each poll (with ?logs=true; null without).
        logs = list(scenario.logs[: poll + 1]) if with_logs else None
        if state == "IN_QUEUE":
            self.send_json(202, {"status": state, "queue_position": position, "request_id": job.request_id})
        elif state == "IN_PROGRESS":
            self.send_json(202, {"status": state, "logs": logs, "request_id": job.request_id})
        else:
            job.completed = True
            self.send_json(200, {"status": state, "logs": logs, "metrics": {"inference_time": 0.01}})

    def _result(self, job: FakeJob) -> None:
        scenario = self.fake.scenario
        if self._injected("result"):
            return
        if scenario.raw_result is not None:
            self.send_bytes(200, scenario.raw_result, "application/json")
            return
        if scenario.output is not None:
            self.send_json(200, scenario.output)
            return
        args = job.arguments
        fmt = args.get("output_format") or args.get("format") or "jpeg"
        count = int(args.get("num_images", 1))
        images = []
        for index in range(count):
            data = make_image(scenario.image_side, fmt, (10 * index, 120, 200))
            url = self.fake.store(f"{job.request_id}-{index}.{fmt}", data, f"image/{fmt}")
            images.append(
                {
                    "url": url,
                    "width": scenario.image_side,
                    "height": scenario.image_side,
                    "content_type": f"image/{fmt}",
                }
            )
        nsfw = scenario.nsfw if isinstance(scenario.nsfw, list) else [scenario.nsfw] * count
        output = {
            "images": images,
            "seed": args.get("seed", 1234),
            "has_nsfw_concepts": nsfw,
            "prompt": args.get("prompt"),
        }
        self.send_json(200, {**output, "timings": {"inference": 0.01}})


@contextmanager
def serve_fal(scenario: FalScenario | None = None, *, tls: bool = False) -> Iterator[FakeFal]:
    """Run a fake fal for the ``with`` block; ``fake.hosts()`` points a generator at it. With
    ``tls`` it speaks https with the certificate ``tests.fakes.server.TLS_CERT``."""
    fake = FakeFal(scenario or FalScenario())
    bound = {"fake": fake, "recorder": fake.recorder}
    queue = type("BoundFalHandler", (FalHandler,), bound)
    run = type("BoundFalRunHandler", (FalHandler,), {**bound, "role": "run"})
    with serve_in_thread(queue, tls=tls) as base_url, serve_in_thread(run, tls=tls) as run_url:
        fake.base_url, fake.run_url = base_url, run_url
        try:
            yield fake
        finally:
            fake.release_all()
        assert not fake.crashes, f"the fake fal server crashed: {fake.crashes!r}"
        assert not fake.dropped, f"fal would have ignored these arguments: {fake.dropped!r}"
