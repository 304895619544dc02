"""A fake ComfyUI server (HTTP and ``/ws`` on one 127.0.0.1 port), per API_CONTRACTS.md section 8
and the messages captured from ComfyUI 0.8.0 in ../shared/providers/comfyui_observed/.

Use as ``with FakeComfyUI() as fake:`` and point the generator's ``base_url`` at ``fake.url``.
Knobs are plain attributes (``render_s``, ``steps``, ``fail_node_class``, ``foreign_events``,
``drop_websocket_after``, ``refuse``...). Every route also answers under ``/api``.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fakes import websocket as ws
from tests.fakes.comfyui_engine import OUTPUT_CLASSES, Engine, Prompt
from tests.fakes.images import solid_bytes
from tests.fakes.multipart import parse_multipart
from tests.fakes.server import JSONHandler, RecordedRequest, Recorder, serve_in_thread

KNOWN_CLASSES = frozenset(
    """KSampler CheckpointLoaderSimple EmptyLatentImage CLIPTextEncode VAEDecode SaveImage PreviewImage LoadImage
    VAEEncode LoraLoader LoraLoaderModelOnly UNETLoader DualCLIPLoader VAELoader SamplerCustomAdvanced KSamplerSelect
    BasicScheduler BasicGuider RandomNoise FluxGuidance EmptySD3LatentImage ModelSamplingFlux EmptyImage ImageInvert""".split()
)
SYSTEM_STATS = {
    "system": {
        "os": "posix",
        "ram_total": 67108864000,
        "ram_free": 60000000000,
        "comfyui_version": "0.8.0",
        "python_version": "3.12.3",
        "pytorch_version": "2.7.1+cu128",
        "embedded_python": False,
        "argv": ["main.py", "--listen", "127.0.0.1"],
    },
    "devices": [
        {
            "name": "cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync",
            "type": "cuda",
            "index": 0,
            "vram_total": 25757220864,
            "vram_free": 22906142720,
            "torch_vram_total": 0,
            "torch_vram_free": 0,
        }
    ],
}


class FakeComfyUI:
    def __init__(self) -> None:
        self.recorder = Recorder()
        self.engine = Engine(self)
        self.sockets: dict[str, queue.Queue[tuple[bytes, bool] | None]] = {}
        self.sockets_lock = threading.Lock()
        self.files: dict[tuple[str, str, str], bytes] = {}  # (type, subfolder, filename) -> bytes
        self.interrupts: list[dict[str, Any] | None] = []  # bodies of POST /interrupt (None: global)
        self.queue_deletes: list[list[str]] = []
        self.ws_connects = 0
        self.http_busy_s = 0.0
        self._stack = ExitStack()
        self._numbers = 0
        self.url = ""
        self.render_s = 0.0
        self.steps = 3
        self.previews = True
        self.images_per_output = 1
        self.output_color = (204, 153, 101)
        self.fail_node_class: str | None = None
        self.fail_message = "CUDA out of memory. Tried to allocate 2.00 GiB"
        self.foreign_events = False
        self.drop_websocket_after: int | None = None  # close every socket after this many messages
        self.refuse: int | None = None  # answer POST /prompt with this status (e.g. 503 while restarting)
        self.lose_prompts = False  # accept prompts, then forget them (a server that restarted)
        self.honour_prompt_id = True  # False: an older ComfyUI that assigns its own prompt ids
        self.nonsense_prompt = False  # 200 from POST /prompt without a prompt_id
        # Seconds between the /ws handshake and filing the socket under its client id. ComfyUI
        # takes the same two steps in that order, so a busy server sends a prompt posted in
        # between to nobody: the gap the client's wait for the first frame closes.
        self.ws_register_delay_s = 0.0
        self._closed = False  # set on exit: a socket filed afterwards is closed at once

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Adds the time spent answering an HTTP call to ``http_busy_s`` (benchmarks subtract it)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            with self.sockets_lock:
                self.http_busy_s += time.perf_counter() - start

    def __enter__(self) -> FakeComfyUI:
        self.engine.thread.start()
        self._stack.callback(self.engine.stop)
        self._stack.callback(self._close_sockets)
        self.url = self._stack.enter_context(serve_in_thread(self._handler()))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.recorder.requests

    def paths(self, method: str | None = None) -> list[str]:
        return [r.path.split("?")[0] for r in self.requests if method is None or r.method == method]

    # -- events -----------------------------------------------------------------------------

    def send_to(self, client_id: str, message: Any, *, binary: bool = False) -> None:
        payload = message if binary else json.dumps(message).encode()
        with self.sockets_lock:
            target = self.sockets.get(client_id)
        if target is not None:
            target.put((payload, binary))

    def broadcast(self, message: Any) -> None:
        with self.sockets_lock:
            targets = list(self.sockets)
        for client_id in targets:
            self.send_to(client_id, message)

    def send_foreign(self, client_id: str) -> None:
        """Another prompt's events on this socket (as when a client id is shared), ending with null."""
        other = str(uuid.uuid4())
        for kind, data in (
            ("execution_start", {"prompt_id": other, "timestamp": 0}),
            ("progress", {"value": 1, "max": 2, "prompt_id": other, "node": "3"}),
            (
                "executed",
                {
                    "node": "9",
                    "display_node": "9",
                    "output": {"images": [{"filename": "other.png", "subfolder": "", "type": "output"}]},
                    "prompt_id": other,
                },
            ),
            (
                "execution_error",
                {
                    "prompt_id": other,
                    "node_id": "3",
                    "node_type": "KSampler",
                    "exception_message": "not yours",
                    "exception_type": "RuntimeError",
                    "traceback": [],
                },
            ),
            ("executing", {"node": None, "prompt_id": other}),
        ):
            self.send_to(client_id, {"type": kind, "data": data})

    def _close_sockets(self) -> None:
        with self.sockets_lock:
            self._closed = True
            for target in self.sockets.values():
                target.put(None)

    def store_output(self, node: dict[str, Any], index: int) -> dict[str, str]:
        self._numbers += 1
        kind = "output" if node["class_type"] == "SaveImage" else "temp"
        prefix = str(node.get("inputs", {}).get("filename_prefix", "ComfyUI_temp"))
        subfolder, _, stem = prefix.rpartition("/")
        name = f"{stem}_{self._numbers:05d}_.png"
        self.files[(kind, subfolder, name)] = solid_bytes(self.output_color, (64, 48), "png")
        return {"filename": name, "subfolder": subfolder, "type": kind}

    # -- HTTP -------------------------------------------------------------------------------

    def _handler(self) -> type[JSONHandler]:
        fake = self

        class Handler(JSONHandler):
            recorder = fake.recorder

            def route(self) -> str:
                path = urlsplit(self.path).path
                return path[4:] if path.startswith("/api/") else path

            def do_GET(self) -> None:
                path, query = self.route(), parse_qs(urlsplit(self.path).query)
                if path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
                    self.read_body()
                    fake._serve_socket(self, query.get("clientId", [uuid.uuid4().hex])[0])
                    return
                with fake.busy():
                    self.get(path, query)

            def get(self, path: str, query: dict[str, list[str]]) -> None:
                self.read_body()
                if path == "/system_stats":
                    self.send_json(200, SYSTEM_STATS)
                elif path == "/queue":
                    with fake.engine.lock:
                        running = [fake.engine.running.item()] if fake.engine.running else []
                        pending = [p.item() for p in fake.engine.pending]
                    self.send_json(200, {"queue_running": running, "queue_pending": pending})
                elif path == "/prompt":
                    self.send_json(200, {"exec_info": {"queue_remaining": fake.engine.remaining()}})
                elif match := re.fullmatch(r"/history/([^/]+)", path):
                    with fake.engine.lock:
                        entry = fake.engine.history.get(match[1])
                    self.send_json(200, {match[1]: entry} if entry else {})
                elif path == "/view":
                    self._view(query)
                elif path.startswith("/object_info"):
                    self.send_json(
                        200, {name: {"name": name, "output_node": name in OUTPUT_CLASSES} for name in KNOWN_CLASSES}
                    )
                else:
                    self.send_json(404, {"error": "not found"})

            def _view(self, query: dict[str, list[str]]) -> None:
                name, sub = query.get("filename", [""])[0], query.get("subfolder", [""])[0]
                if ".." in name or ".." in sub or name.startswith("/"):
                    self.send_bytes(400, b"", "text/plain")
                    return
                data = fake.files.get((query.get("type", ["output"])[0], sub, name))
                if data is None:
                    self.send_bytes(404, b"404: Not Found", "text/plain")
                else:
                    self.send_bytes(200, data, "image/png")

            def do_POST(self) -> None:
                with fake.busy():
                    self.post()

            def post(self) -> None:
                path, body = self.route(), self.read_body()
                if path == "/prompt":
                    fake._prompt(self, body)
                elif path == "/upload/image":
                    fake._upload(self, body)
                elif path == "/queue":
                    request = json.loads(body or b"{}")
                    if "delete" in request:
                        fake.queue_deletes.append(list(request["delete"]))
                        with fake.engine.lock:
                            fake.engine.pending = [
                                p for p in fake.engine.pending if p.prompt_id not in request["delete"]
                            ]
                    self.send_bytes(200, b"", "text/plain")
                elif path == "/interrupt":
                    request = json.loads(body) if body else None
                    fake.interrupts.append(request)
                    with fake.engine.lock:
                        running = fake.engine.running
                        if running and (request is None or request.get("prompt_id") in (None, running.prompt_id)):
                            running.interrupted.set()
                    self.send_bytes(200, b"", "text/plain")
                else:
                    self.send_json(404, {"error": "not found"})

        return Handler

    def _prompt(self, handler: JSONHandler, body: bytes) -> None:
        if self.refuse is not None:
            handler.send_bytes(self.refuse, b"503 Service Unavailable", "text/plain")
            return
        request = json.loads(body)
        if "prompt" not in request:
            error = {"type": "no_prompt", "message": "No prompt provided", "details": "", "extra_info": {}}
            handler.send_json(400, {"error": error, "node_errors": {}})
            return
        graph = request["prompt"]
        for node_id, node in graph.items():
            if node.get("class_type") not in KNOWN_CLASSES:
                message = f"Cannot execute because node {node.get('class_type')} does not exist."
                error = {
                    "type": "invalid_prompt",
                    "message": message,
                    "details": f"Node ID '#{node_id}'",
                    "extra_info": {},
                }
                handler.send_json(400, {"error": error, "node_errors": {}})
                return
        node_errors = self._validate(graph)
        if node_errors:
            error = {
                "type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation",
                "details": "",
                "extra_info": {},
            }
            handler.send_json(400, {"error": error, "node_errors": node_errors})
            return
        if self.nonsense_prompt:
            handler.send_json(200, {"ok": True})
            return
        prompt_id = (self.honour_prompt_id and request.get("prompt_id")) or str(uuid.uuid4())
        outputs = [i for i, node in graph.items() if node["class_type"] in OUTPUT_CLASSES]
        number = self.engine.counter
        self.engine.counter += 1
        if not self.lose_prompts:
            self.engine.submit(Prompt(number, prompt_id, graph, request.get("client_id", ""), outputs))
        handler.send_json(200, {"prompt_id": prompt_id, "number": number, "node_errors": {}})

    def _validate(self, graph: dict[str, Any]) -> dict[str, Any]:
        """Broken links and LoadImage files that were never uploaded, as ComfyUI reports them."""
        errors: dict[str, Any] = {}
        for node_id, node in graph.items():
            problems = []
            for name, value in node.get("inputs", {}).items():
                if isinstance(value, list) and len(value) == 2 and value[0] not in graph:
                    problems.append(
                        {
                            "type": "exception_during_inner_validation",
                            "message": "Exception when validating inner node",
                            "details": f"{name}: node {value[0]} does not exist",
                            "extra_info": {"input_name": name},
                        }
                    )
            if node["class_type"] == "LoadImage":
                sub, _, name = str(node["inputs"].get("image", "")).rpartition("/")
                if ("input", sub, name) not in self.files:
                    problems.append(
                        {
                            "type": "custom_validation_failed",
                            "message": "Custom validation failed for node",
                            "details": f"image - Invalid image file: {node['inputs'].get('image')}",
                            "extra_info": {"input_name": "image"},
                        }
                    )
            if problems:
                errors[node_id] = {"errors": problems, "dependent_outputs": [], "class_type": node["class_type"]}
        return errors

    def _upload(self, handler: JSONHandler, body: bytes) -> None:
        fields, files = parse_multipart(body, handler.headers.get("Content-Type", ""))
        image = next((f for f in files if f.field == "image"), None)
        if image is None:
            handler.send_bytes(400, b"", "text/plain")
            return
        kind = fields.get("type", ["input"])[0]
        sub = fields.get("subfolder", [""])[0]
        name = image.filename
        overwrite = fields.get("overwrite", ["false"])[0] in ("true", "1")
        existing = self.files.get((kind, sub, name))
        if existing is not None and existing != image.data and not overwrite:
            stem, dot, ext = name.rpartition(".")
            name = f"{stem} (1){dot}{ext}"
        self.files[(kind, sub, name)] = image.data
        handler.send_json(200, {"name": name, "subfolder": sub, "type": kind})

    # -- websocket --------------------------------------------------------------------------

    def _serve_socket(self, handler: JSONHandler, client_id: str) -> None:
        handler.send_response(101, "Switching Protocols")
        handler.send_header("Upgrade", "websocket")
        handler.send_header("Connection", "Upgrade")
        handler.send_header("Sec-WebSocket-Accept", ws.accept_key(handler.headers["Sec-WebSocket-Key"]))
        handler.end_headers()
        handler.wfile.flush()
        outbox: queue.Queue[tuple[bytes, bool] | None] = queue.Queue()
        time.sleep(self.ws_register_delay_s)
        with self.sockets_lock:
            self.sockets[client_id] = outbox
            self.ws_connects += 1
            if self._closed:
                outbox.put(None)
        sock = handler.connection
        first = {
            "type": "status",
            "data": {"status": {"exec_info": {"queue_remaining": self.engine.remaining()}}, "sid": client_id},
        }
        outbox.put((json.dumps(first).encode(), False))
        sent = 0
        replies: queue.Queue[bytes] = queue.Queue()
        reader = threading.Thread(target=_read_client, args=(sock, outbox, replies), daemon=True)
        reader.start()
        try:
            while True:
                item = outbox.get()
                while not replies.empty():
                    sock.sendall(replies.get())
                if item is None:
                    sock.sendall(ws.frame(ws.CLOSE, b"\x03\xe9"))  # 1001 going away
                    return
                payload, binary = item
                if payload == b"" and not binary:
                    return  # the client closed; its close frame was answered
                if self.drop_websocket_after is not None and sent >= self.drop_websocket_after:
                    return  # an abrupt drop: no close frame
                sock.sendall(ws.frame(ws.BINARY if binary else ws.TEXT, payload))
                sent += 1
        except (ConnectionError, OSError):
            return
        finally:
            with self.sockets_lock:
                if self.sockets.get(client_id) is outbox:
                    del self.sockets[client_id]
            handler.close_connection = True
            # Wakes the reader from its recv even when the client keeps its end open.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            reader.join(timeout=5)


def _read_client(sock: Any, outbox: queue.Queue[Any], replies: queue.Queue[bytes]) -> None:
    """Client frames, in a thread of their own so the sender never polls: pongs and the close reply."""
    try:
        while True:
            opcode, payload = ws.read_frame(sock)
            if opcode == ws.PING:
                replies.put(ws.frame(ws.PONG, payload))
                outbox.put((b"", True))  # wake the sender; an empty binary frame is harmless
            elif opcode == ws.CLOSE:
                replies.put(ws.frame(ws.CLOSE, payload[:2]))
                outbox.put((b"", False))
                return
    except (ConnectionError, OSError):
        outbox.put(None)


def images_in(fake: FakeComfyUI, kind: str = "input") -> Iterator[tuple[str, str, bytes]]:
    for (k, sub, name), data in fake.files.items():
        if k == kind:
            yield sub, name, data
