"""A fake InvokeAI server (API_CONTRACTS.md section 9): models, uploads, boards, images, session queue.

``with FakeInvokeAI() as fake:`` serves on 127.0.0.1. A queue item is ``pending`` for
``pending_polls`` reads of it, ``in_progress`` for ``running_polls`` more, then it runs: the
graph is checked the way the real server checks it at run time (required inputs, known model
keys, uploaded images), and the item ends ``completed`` with an ``image_output`` per image node,
or ``failed`` (``fail_with``), or stays ``in_progress`` while ``hold`` is set until cancelled.
Servers before 6.0 send no ``item_ids`` from enqueue_batch; set ``version`` to test that.
"""

from __future__ import annotations

import functools
import json
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from tests.fakes.images import solid_bytes
from tests.fakes.invokeai_handler import InvokeAIHandler
from tests.fakes.invokeai_schema import INVOCATIONS, GraphRejected, missing_inputs, validate_graph
from tests.fakes.invokeai_store import MODELS, ModelStore
from tests.fakes.server import RecordedRequest, Recorder, serve_in_thread

TRACEBACK = 'Traceback (most recent call last):\n  File "invokeai/app/services/session_processor.py", line 1\n'


@dataclass
class Item:
    item_id: int
    batch_id: str
    graph: dict[str, Any]
    status: str = "pending"
    reads: int = 0
    error: tuple[str, str] | None = None
    results: dict[str, Any] = field(default_factory=dict)
    mapping: dict[str, list[str]] = field(default_factory=dict)
    enqueued_at: float = field(default_factory=time.perf_counter)
    observed_at: float | None = None  # the read that first saw it finished (benchmarks)


class FakeInvokeAI:
    def __init__(self, *, version: str = "6.9.0", token: str | None = None) -> None:
        self.recorder = Recorder()
        self.lock = threading.RLock()
        self.started = threading.Event()  # some item reached in_progress
        self.enqueue_seen = threading.Event()  # an enqueue_batch arrived
        self.version, self.token = version, token
        self._stack = ExitStack()
        self.url = ""
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.models = ModelStore([dict(m) for m in MODELS])
            self.pending_polls, self.running_polls = 1, 1
            # When set, an item renders for this long after enqueue instead of for a number of reads.
            self.render_s: float | None = None
            self.fail_with: tuple[str, str] | None = None
            self.hold = False
            self.enqueue_gate: threading.Event | None = None  # when set: enqueue_batch waits for it
            self.nonsense: set[str] = set()  # routes ("item", "enqueue", "models", "image") answering garbage
            self.items: dict[int, Item] = {}
            self.batches: list[dict[str, Any]] = []
            self.ignored_fields: list[str] = []
            self.images: dict[str, dict[str, Any]] = {}
            self.boards: dict[str, str] = {}  # board_id -> name
            self.cancelled: list[int] = []
            self.next_id = 1
            self.started.clear()
            self.enqueue_seen.clear()
            self.recorder.requests.clear()

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.recorder.requests

    def paths(self, method: str | None = None) -> list[str]:
        return [urlsplit(r.path).path for r in self.requests if method in (None, r.method)]

    def __enter__(self) -> FakeInvokeAI:
        handler = type("Handler", (InvokeAIHandler,), {"fake": self, "recorder": self.recorder})
        self.url = self._stack.enter_context(serve_in_thread(handler))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.hold = False
        if self.enqueue_gate is not None:
            self.enqueue_gate.set()
        self._stack.close()

    # -- queue ------------------------------------------------------------------------------------

    def enqueue(self, body: Any) -> tuple[int, Any]:
        self.enqueue_seen.set()
        if self.enqueue_gate is not None:
            self.enqueue_gate.wait(5.0)
        batch = body.get("batch") if isinstance(body, dict) else None
        if not isinstance(batch, dict) or "graph" not in batch:
            return 422, {"detail": [{"loc": ["body", "batch", "graph"], "msg": "Field required", "type": "missing"}]}
        try:
            self.ignored_fields += validate_graph(batch["graph"])
            seeds = _batch_seeds(batch)
        except GraphRejected as exc:
            return 422, {"detail": [{"loc": exc.loc, "msg": exc.msg, "type": "value_error"}]}
        batch_id = batch.get("batch_id") or uuid.uuid4().hex
        ids = []
        with self.lock:
            self.batches.append(batch)
            for seed in seeds:
                graph = json.loads(json.dumps(batch["graph"]))
                if seed is not None:
                    graph["nodes"]["seed"]["value"] = seed
                self.items[self.next_id] = Item(self.next_id, batch_id, graph)
                ids.append(self.next_id)
                self.next_id += 1
        result: dict[str, Any] = {"queue_id": "default", "enqueued": len(ids), "requested": len(ids), "priority": 0}
        result["batch"] = batch | {"batch_id": batch_id}
        if int(self.version.split(".")[0]) >= 6:
            result["item_ids"] = ids
        return 200, result

    def read_item(self, item_id: int) -> dict[str, Any] | None:
        with self.lock:
            item = self.items.get(item_id)
            if item is None:
                return None
            item.reads += 1
            timed = self.render_s is not None
            if item.status == "pending" and (timed or item.reads > self.pending_polls):
                item.status = "in_progress"
                self.started.set()
            if timed:
                finished = time.perf_counter() - item.enqueued_at >= (self.render_s or 0.0)
            else:
                finished = item.reads > self.pending_polls + self.running_polls
            if item.status == "in_progress" and finished and not self.hold:
                self._run(item)
                item.observed_at = time.perf_counter()
            return self.item_json(item)

    def cancel(self, item_id: int) -> dict[str, Any] | None:
        with self.lock:
            item = self.items.get(item_id)
            if item is None:
                return None
            if item.status not in ("completed", "failed", "canceled"):
                item.status = "canceled"
                self.cancelled.append(item_id)
            return self.item_json(item)

    def _run(self, item: Item) -> None:
        """Execute the graph the way the real server would fail or finish it."""
        failure = self.fail_with or self._run_time_error(item.graph)
        if failure is not None:
            item.status, item.error = "failed", failure
            return
        for node_id, node in item.graph["nodes"].items():
            if not INVOCATIONS[node["type"]].makes_image:
                continue
            prepared = str(uuid.uuid4())
            width, height = self._image_size(item.graph, node_id)
            name = f"{uuid.uuid4()}.png"
            board = (node.get("board") or {}).get("board_id")
            self.images[name] = {"data": _output_png(width, height), "board_id": board}
            self.images[name]["is_intermediate"] = node.get("is_intermediate", False)
            item.mapping[node_id] = [prepared]
            image = {"image_name": name}
            item.results[prepared] = {"type": "image_output", "image": image, "width": width, "height": height}
        item.status = "completed"

    def _run_time_error(self, graph: dict[str, Any]) -> tuple[str, str] | None:
        missing = missing_inputs(graph)
        if missing:
            return "ValidationError", f"1 validation error for invocation\n{missing}"
        for node in graph["nodes"].values():
            for value in node.values():
                if isinstance(value, dict) and "key" in value and self.models.by_key(value["key"]) is None:
                    return "UnknownModelException", f"Unknown model: {value['key']}"
                if isinstance(value, dict) and "image_name" in value and value["image_name"] not in self.images:
                    return "ImageFileNotFoundException", f"Image {value['image_name']} not found"
            board = (node.get("board") or {}).get("board_id")
            if board is not None and board not in self.boards:
                return "IntegrityError", "FOREIGN KEY constraint failed"
        return None

    @staticmethod
    def _image_size(graph: dict[str, Any], node_id: str) -> tuple[int, int]:
        node = graph["nodes"][node_id]
        if "width" in node:
            return node["width"], node["height"]
        for other in graph["nodes"].values():  # the size the denoiser was asked for
            if other["type"] in ("noise", "flux_denoise"):
                return other["width"], other["height"]
        return 64, 64

    def item_json(self, item: Item) -> dict[str, Any]:
        error_type, error_message = item.error or (None, None)
        return {
            "item_id": item.item_id,
            "status": item.status,
            "priority": 0,
            "batch_id": item.batch_id,
            "session_id": f"session-{item.item_id}",
            "error_type": error_type,
            "error_message": error_message,
            "error_traceback": TRACEBACK + f"{error_type}: {error_message}" if item.error else None,
            "created_at": "2026-01-01 00:00:00",
            "updated_at": "2026-01-01 00:00:01",
            "started_at": None,
            "completed_at": None,
            "queue_id": "default",
            "field_values": None,
            "session": {
                "id": f"session-{item.item_id}",
                "graph": item.graph,
                "execution_graph": {"nodes": {}, "edges": []},
                "executed": [],
                "executed_history": [],
                "results": item.results,
                "errors": {},
                "prepared_source_mapping": {p[0]: source for source, p in item.mapping.items()},
                "source_prepared_mapping": item.mapping,
            },
        }

    def queue_page(self, query: dict[str, list[str]]) -> dict[str, Any]:
        """``GET /list`` of servers before 6.0: cursor pagination by item id."""
        limit = int(query.get("limit", ["50"])[0])
        cursor = int(query.get("cursor", ["0"])[0])
        with self.lock:
            items = [i for i in sorted(self.items.values(), key=lambda i: i.item_id) if i.item_id > cursor]
            rows = [{k: v for k, v in self.item_json(i).items() if k != "session"} for i in items[:limit]]
        return {"limit": limit, "has_more": len(items) > limit, "items": rows}


@functools.lru_cache(maxsize=16)
def _output_png(width: int, height: int) -> bytes:
    """One encode per size: the fake's own time stays out of what benchmarks measure."""
    return solid_bytes((20, 120, 200), (width, height))


def _batch_seeds(batch: dict[str, Any]) -> list[int | None]:
    data = batch.get("data")
    if not data:
        return [None] * int(batch.get("runs", 1))
    (zipped,) = data
    (datum,) = zipped
    node = batch["graph"]["nodes"].get(datum["node_path"])
    if node is None or datum["field_name"] not in INVOCATIONS[node["type"]].inputs:
        raise GraphRejected(["body", "batch"], f"Value error, Node {datum['node_path']} not found in graph")
    return list(datum["items"])
