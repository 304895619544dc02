"""Run a ``http.server`` handler on 127.0.0.1:0 in a daemon thread (httpx's serve_in_thread)."""

from __future__ import annotations

import json
import ssl
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Recorder:
    """Requests seen by a fake server, for assertions."""

    requests: list[RecordedRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, request: RecordedRequest) -> None:
        with self.lock:
            self.requests.append(request)


class JSONHandler(BaseHTTPRequestHandler):
    """Base handler with helpers; subclasses implement do_GET/do_POST/..."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; without this each response waits ~40 ms (Nagle).
    disable_nagle_algorithm = True
    recorder: Recorder | None = None

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.recorder is not None:
            self.recorder.add(RecordedRequest(self.command, self.path, dict(self.headers.items()), body))
        return body

    def send_bytes(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(status, json.dumps(payload).encode(), "application/json", headers)


# A self-signed certificate for IP 127.0.0.1 and localhost (valid to 2126), for fakes served over
# https. Test-only: the key guards nothing but these fakes.
TLS_DIR = Path(__file__).parent / "tls"
TLS_CERT = TLS_DIR / "cert.pem"


def tls_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(TLS_CERT, TLS_DIR / "key.pem")
    return context


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up before its answer was written (tests cancel and time out
        # calls on purpose) is no fault of the server: its traceback, printed to stderr by a
        # handler thread, lands between tests' output and misleads whoever reads the log.
        if isinstance(sys.exception(), ConnectionError):
            return
        super().handle_error(request, client_address)


@contextmanager
def serve_in_thread(handler: type[BaseHTTPRequestHandler], *, tls: bool = False) -> Iterator[str]:
    """Yield the server's base URL (``http://127.0.0.1:<port>``, or https with ``tls``, trusted
    through ``TLS_CERT``); shut it down afterwards."""
    server = _Server(("127.0.0.1", 0), handler)
    if tls:
        # The handshake happens per connection in the handler thread, not in accept().
        server.socket = tls_context().wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    # shutdown() waits for serve_forever's next poll: the default 0.5 s would dominate test time.
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), name="fake-http", daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        _stop(server, thread)


STOP_TIMEOUT_S = 10.0


def _stop(server: ThreadingHTTPServer, thread: threading.Thread) -> None:
    """Stop serving within ``STOP_TIMEOUT_S`` or fail the test: ``shutdown()`` alone waits
    without a deadline for ``serve_forever`` to notice. Handler threads are daemons that no
    one waits for (a websocket handler lives as long as its client)."""
    stopper = threading.Thread(target=server.shutdown, name="fake-http-stop", daemon=True)
    stopper.start()
    thread.join(timeout=STOP_TIMEOUT_S)
    server.server_close()
    if thread.is_alive():
        raise RuntimeError(f"the fake server on port {server.server_address[1]} did not stop in {STOP_TIMEOUT_S:g} s")
