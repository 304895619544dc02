"""A fake Ollama server (``/``, ``/api/version``, ``/api/tags``, ``/api/generate``, ``/api/chat``),
per API_CONTRACTS.md section 11.

The "model" rewrites a prompt deterministically: it drops repeated words and filler words,
which is what a compression instruction asks of a real one. Streaming is Ollama's default
(``stream`` absent or true): NDJSON lines of a few words with ``done: false``, then a final
``done: true`` line with the timing fields. An unknown model is a 404 ``{"error": "model 'x'
not found"}``. Use as ``with FakeOllama() as fake:``; set ``fake.scenario`` per test.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import ExitStack
from typing import Any, Literal

from tests.fakes.server import JSONHandler, Recorder, serve_in_thread

Scenario = Literal[
    "ok",  # the rewritten prompt
    "echo",  # the prompt unchanged (a model that did not shorten it)
    "slow",  # answers after ``delay_s`` (or when the fake shuts down)
    "midstream_error",  # streaming: one chunk, then an {"error"} line on the 200 response
    "server_error",  # 500 {"error"}
]
FILLER = frozenset({"a", "an", "the", "very", "really", "quite", "of", "and", "with", "that", "is", "in"})


def rewrite(prompt: str) -> str:
    seen: set[str] = set()
    kept: list[str] = []
    for word in prompt.split():
        folded = word.lower().strip(",.;:")
        if folded in FILLER or folded in seen:
            continue
        seen.add(folded)
        kept.append(word)
    return " ".join(kept)


class FakeOllama:
    def __init__(self, models: tuple[str, ...] = ("llama3.2:1b",)) -> None:
        self.models = list(models)
        self.scenario: Scenario = "ok"
        self.delay_s = 0.0  # the model's own time, for every answer (slow: how long it stalls)
        self.recorder = Recorder()
        self.released = threading.Event()
        self._stack = ExitStack()
        self.base_url = ""

    def __enter__(self) -> FakeOllama:
        fake = self

        class Handler(JSONHandler):
            recorder = fake.recorder

            def do_GET(self) -> None:
                self.read_body()
                if self.path == "/":
                    self.send_bytes(200, b"Ollama is running", "text/plain")
                elif self.path == "/api/version":
                    self.send_json(200, {"version": "0.12.3"})
                elif self.path == "/api/tags":
                    self.send_json(200, {"models": [fake.tag(name) for name in fake.models]})
                else:
                    self.send_json(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = self.read_body()
                if self.path not in ("/api/generate", "/api/chat"):
                    self.send_json(404, {"error": "not found"})
                    return
                fake.answer(self, self.path == "/api/chat", json.loads(body or b"{}"))

        self.base_url = self._stack.enter_context(serve_in_thread(Handler))
        self._stack.callback(self.released.set)  # runs first: frees handlers stuck in "slow"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def tag(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "model": name,
            "modified_at": "2026-01-01T00:00:00Z",
            "size": 1_300_000_000,
            "digest": "0" * 64,
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "llama",
                "families": ["llama"],
                "parameter_size": "1.2B",
                "quantization_level": "Q8_0",
            },
        }

    @property
    def generate_calls(self) -> list[dict[str, Any]]:
        return [r.json() for r in self.recorder.requests if r.path in ("/api/generate", "/api/chat")]

    def answer(self, handler: JSONHandler, chat: bool, request: dict[str, Any]) -> None:
        model = request.get("model", "")
        if model not in self.models:
            handler.send_json(404, {"error": f"model '{model}' not found"})
            return
        if self.scenario == "server_error":
            handler.send_json(500, {"error": "llama runner process has terminated"})
            return
        started = time.perf_counter()
        if self.scenario == "slow":
            self.released.wait(self.delay_s)
        elif self.delay_s:
            time.sleep(self.delay_s)
        if chat:
            prompt = " ".join(m.get("content", "") for m in request.get("messages", []) if m.get("role") == "user")
        else:
            prompt = request.get("prompt", "")
        text = prompt if self.scenario == "echo" else rewrite(prompt)
        elapsed_ns = int((time.perf_counter() - started) * 1e9)
        final = {
            "model": model,
            "created_at": "2026-01-01T00:00:00Z",
            "done": True,
            "done_reason": "stop",
            "total_duration": elapsed_ns,
            "load_duration": 0,
            "prompt_eval_count": len(prompt.split()),
            "prompt_eval_duration": 0,
            "eval_count": len(text.split()),
            "eval_duration": elapsed_ns,
        }
        if request.get("stream", True) is False:
            content = {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
            handler.send_json(200, {**final, **content})
            return
        lines = []
        words = text.split(" ")
        for index in range(0, len(words), 3):
            piece = " ".join(words[index : index + 3]) + (" " if index + 3 < len(words) else "")
            chunk = {"message": {"role": "assistant", "content": piece}} if chat else {"response": piece}
            lines.append({"model": model, "created_at": final["created_at"], "done": False, **chunk})
            if self.scenario == "midstream_error":
                lines.append({"error": "an error was encountered while running the model"})
                break
        else:
            lines.append(
                {**final, "message": {"role": "assistant", "content": ""}} if chat else {**final, "response": ""}
            )
        body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        handler.send_bytes(200, body, "application/x-ndjson")
