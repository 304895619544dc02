"""State and scenario knobs of the fake fal server (tests/fakes/fal.py): what it does, what it saw."""

from __future__ import annotations

import io
import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from tests.fakes.server import RecordedRequest, Recorder

DEFAULT_KEY = "fake-fal-key-0123456789"
DEFAULT_STATUSES: tuple[tuple[str, int | None], ...] = (
    ("IN_QUEUE", 1),
    ("IN_QUEUE", 0),
    ("IN_PROGRESS", None),
    ("COMPLETED", None),
)
HANG_LIMIT_S = 10.0  # a hung status poll gives up after this, so a broken test cannot wedge a thread
STAGES = frozenset({"submit", "run", "status", "result", "cancel", "token", "cdn_upload", "storage_initiate"})


@dataclass
class FakeError:
    """An injected HTTP failure; ``times`` None means every time, else that many times."""

    status: int
    body: Any = None  # JSON-serialisable, or bytes sent as they are
    headers: dict[str, str] = field(default_factory=dict)
    times: int | None = None

    @classmethod
    def validation(cls, msg: str = "bad input", type: str = "value_error", loc: Sequence[str] = ("body", "prompt")):
        return cls(422, {"detail": [{"loc": list(loc), "msg": msg, "type": type}]})

    @classmethod
    def platform(cls, status: int, error_type: str, detail: str = "runner failed") -> FakeError:
        return cls(status, {"detail": detail, "error_type": error_type}, {"X-Fal-Error-Type": error_type})


@dataclass
class FalScenario:
    """What the fake does. Fields may be changed while it runs (read at request time)."""

    key: str = DEFAULT_KEY
    statuses: Sequence[tuple[str, int | None]] = DEFAULT_STATUSES
    errors: dict[str, FakeError] = field(default_factory=dict)  # keys: STAGES
    output: Any = None  # replaces the generated output JSON
    raw_result: bytes | None = None  # served as the result body, e.g. broken JSON
    nsfw: bool | list[bool] = False
    hang_at_poll: int | None = None  # this status poll (0-based) blocks until cancel or shutdown
    submit_delay_s: float = 0.0  # submit answers this late (to cancel a render mid-submit)
    image_side: int = 8
    # Log items; status poll n (0-based) returns the first n + 1 of them, as fal accumulates logs.
    logs: Sequence[dict[str, str]] = ()


@dataclass
class FakeJob:
    request_id: str
    endpoint: str
    arguments: dict[str, Any]
    polls: int = 0
    completed: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    unblock: threading.Event = field(default_factory=threading.Event)  # frees a hung status poll


class FakeFal:
    """Server state: submitted jobs, stored files, recorded requests."""

    def __init__(self, scenario: FalScenario) -> None:
        self.scenario = scenario
        self.base_url = ""  # queue, rest (storage) and CDN
        self.run_url = ""  # the synchronous run host
        self.recorder = Recorder()
        self.jobs: dict[str, FakeJob] = {}
        self.files: dict[str, tuple[bytes, str]] = {}
        self.lock = threading.Lock()
        self.hanging = threading.Event()  # set when a status poll starts hanging (scenario.hang_at_poll)
        self.submitting = threading.Event()  # set when a submit arrives
        self.stopping = threading.Event()  # set at shutdown: ends delays early
        self.crashes: list[Exception] = []
        self.dropped: list[tuple[str, list[str]]] = []  # (endpoint, fields it does not take), see fal_rules
        self._ids = itertools.count(1)

    def hosts(self) -> dict[str, str]:
        """The fal generator's host fields, aimed at this fake."""
        base = self.base_url
        return {"queue_url": base, "run_url": self.run_url, "rest_url": base, "cdn_url": base}

    def release_all(self) -> None:
        """Free every hung status poll and delay (at shutdown)."""
        self.stopping.set()
        with self.lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            job.unblock.set()

    def next_id(self) -> str:
        return f"req-{next(self._ids):04d}"

    def requests(self, method: str | None = None, path_prefix: str = "") -> list[RecordedRequest]:
        with self.recorder.lock:
            seen = list(self.recorder.requests)
        return [r for r in seen if (method is None or r.method == method) and r.path.startswith(path_prefix)]

    def take_error(self, stage: str) -> FakeError | None:
        with self.lock:
            error = self.scenario.errors.get(stage)
            if error is None:
                return None
            if error.times is not None:
                error.times -= 1
                if error.times <= 0:
                    del self.scenario.errors[stage]
            return error

    def store(self, name: str, data: bytes, content_type: str) -> str:
        with self.lock:
            self.files[name] = (data, content_type)
        return f"{self.base_url}/files/{name}"


def make_image(side: int, fmt: str, color: tuple[int, int, int] = (200, 40, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buffer, format="JPEG" if fmt == "jpeg" else "PNG")
    return buffer.getvalue()
