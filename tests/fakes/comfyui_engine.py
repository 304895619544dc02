"""The fake ComfyUI's prompt worker: runs queued prompts one at a time and emits the events a
real ComfyUI 0.8.0 sends (order and shapes from ../shared/providers/comfyui_observed/).

Per prompt: ``status`` -> ``execution_start`` -> ``execution_cached`` -> for each node
``progress_state`` + ``executing`` (the sampler also ``progress`` and binary preview frames) ->
``executed`` for output nodes -> ``execution_success`` -> ``status`` -> ``executing`` with
``node: null``. Errors end with ``execution_error`` (traceback included, as the real one does),
interrupts with ``execution_interrupted``; history is written before the final null node.
"""

from __future__ import annotations

import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.images import solid_bytes

SAMPLERS = frozenset({"KSampler", "KSamplerAdvanced", "SamplerCustomAdvanced"})
OUTPUT_CLASSES = frozenset({"SaveImage", "PreviewImage"})
PREVIEW_JPEG = struct.pack(">II", 1, 1) + solid_bytes((9, 9, 9), (8, 8), "jpeg")


@dataclass
class Prompt:
    number: int
    prompt_id: str
    graph: dict[str, Any]
    client_id: str
    outputs: list[str]
    interrupted: threading.Event = field(default_factory=threading.Event)
    received: float = field(default_factory=time.perf_counter)

    def item(self) -> list[Any]:
        return [self.number, self.prompt_id, self.graph, {"client_id": self.client_id}, self.outputs]


def now_ms() -> int:
    return int(time.time() * 1000)


class Engine:
    """``fake`` is the FakeComfyUI (knobs, sockets, stored files)."""

    def __init__(self, fake: Any) -> None:
        self.fake = fake
        self.pending: list[Prompt] = []
        self.running: Prompt | None = None
        self.history: dict[str, Any] = {}
        self.render_times: dict[str, float] = {}
        self.lock = threading.Condition()
        self.stopped = False
        self.counter = 0
        self.thread = threading.Thread(target=self._loop, name="fake-comfyui-worker", daemon=True)

    def submit(self, prompt: Prompt) -> None:
        with self.lock:
            self.pending.append(prompt)
            self.lock.notify_all()
        self.fake.broadcast(
            {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": self.remaining()}}}}
        )

    def remaining(self) -> int:
        return len(self.pending) + (1 if self.running else 0)

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            if self.running:
                self.running.interrupted.set()
            self.lock.notify_all()

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.pending and not self.stopped:
                    self.lock.wait()
                if self.stopped:
                    return
                self.running = self.pending.pop(0)
            try:
                self._execute(self.running)
            finally:
                with self.lock:
                    self.running = None

    def _execute(self, prompt: Prompt) -> None:
        fake, pid, send = self.fake, prompt.prompt_id, self.fake.send_to
        messages: list[list[Any]] = []

        def event(kind: str, data: dict[str, Any], *, record: bool = False) -> None:
            send(prompt.client_id, {"type": kind, "data": data})
            if record:
                messages.append([kind, data])

        event("status", {"status": {"exec_info": {"queue_remaining": self.remaining()}}})
        event("execution_start", {"prompt_id": pid, "timestamp": now_ms()}, record=True)
        event("execution_cached", {"nodes": [], "prompt_id": pid, "timestamp": now_ms()}, record=True)
        if fake.foreign_events:
            fake.send_foreign(prompt.client_id)
        outputs: dict[str, Any] = {}
        executed: list[str] = []
        error: tuple[str, dict[str, Any]] | None = None
        for node_id, node in prompt.graph.items():
            state = {node_id: {"value": 0.0, "max": 1.0, "state": "running", "node_id": node_id, "prompt_id": pid}}
            event("progress_state", {"prompt_id": pid, "nodes": state})
            event("executing", {"node": node_id, "display_node": node_id, "prompt_id": pid})
            if node["class_type"] in SAMPLERS:
                error = self._sample(prompt, node_id, node)
            if error is None and fake.fail_node_class == node["class_type"]:
                error = ("execution_error", self._error_data(prompt, node_id, node, executed))
            if error is not None:
                break
            executed.append(node_id)
            if node_id in prompt.outputs:
                images = [fake.store_output(node, n) for n in range(fake.images_per_output)]
                outputs[node_id] = {"images": images}
                event(
                    "executed",
                    {"node": node_id, "display_node": node_id, "output": {"images": images}, "prompt_id": pid},
                )
        if error is not None:
            kind, data = error
            event(kind, data, record=True)
            status = {"status_str": "error", "completed": False, "messages": messages}
        else:
            event("execution_success", {"prompt_id": pid, "timestamp": now_ms()}, record=True)
            status = {"status_str": "success", "completed": True, "messages": messages}
        with self.lock:
            self.history[pid] = {"prompt": prompt.item(), "outputs": outputs, "status": status, "meta": {}}
            self.render_times[pid] = time.perf_counter() - prompt.received  # queue + run, for benchmarks
            left = len(self.pending)
        event("status", {"status": {"exec_info": {"queue_remaining": left}}})
        event("executing", {"node": None, "prompt_id": pid})

    def _sample(self, prompt: Prompt, node_id: str, node: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        fake, pid = self.fake, prompt.prompt_id
        steps = max(1, int(fake.steps))
        for step in range(1, steps + 1):
            if prompt.interrupted.wait(fake.render_s / steps):
                return "execution_interrupted", {
                    "prompt_id": pid,
                    "node_id": node_id,
                    "node_type": node["class_type"],
                    "executed": [],
                    "timestamp": now_ms(),
                }
            fake.send_to(
                prompt.client_id,
                {"type": "progress", "data": {"value": step, "max": steps, "prompt_id": pid, "node": node_id}},
            )
            if fake.previews:
                fake.send_to(prompt.client_id, PREVIEW_JPEG, binary=True)
        return None

    def _error_data(self, prompt: Prompt, node_id: str, node: dict[str, Any], executed: list[str]) -> dict[str, Any]:
        return {
            "prompt_id": prompt.prompt_id,
            "node_id": node_id,
            "node_type": node["class_type"],
            "executed": executed,
            "exception_message": self.fake.fail_message,
            "exception_type": "RuntimeError",
            "traceback": ['  File "/opt/ComfyUI/execution.py", line 518, in execute\n    SECRET_TRACEBACK_LINE\n'],
            "current_inputs": {},
            "current_outputs": {},
            "timestamp": now_ms(),
        }
