"""Images made in memory by Pillow, and a fake HTTP server that serves them (plus failure
routes: 404, slow, garbage, oversize, redirects) for the reference-image tests."""

from __future__ import annotations

import io
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

from PIL import Image, ImageStat

from tests.fakes.server import JSONHandler, Recorder, serve_in_thread

OVERSIZE_BYTES = 4096
# How long a blocked handler waits before giving up; tests release it well before this.
HANDLER_WAIT_S = 5.0


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def solid(
    size: tuple[int, int] = (32, 24), color: tuple[int, int, int] = (200, 30, 30), mode: str = "RGB"
) -> Image.Image:
    return Image.new(mode, size, color)


def mean_colour(path: str | None) -> tuple[float, ...]:
    """The average colour of the image file at ``path`` (a rendered output)."""
    assert path is not None
    with Image.open(path) as image:
        return tuple(ImageStat.Stat(image.convert("RGB")).mean)


def noise(size: tuple[int, int] = (64, 64)) -> Image.Image:
    """Incompressible content, so a cut file is missing real image data."""
    channel = Image.effect_noise(size, 100)
    return Image.merge("RGB", (channel, channel.rotate(90), channel.rotate(180)))


def solid_bytes(color: tuple[int, int, int], size: tuple[int, int] = (8, 8), fmt: str = "png") -> bytes:
    """A small, real, decodable image of one colour, encoded as ``fmt``: the one helper every
    fake server and test uses for image bytes."""
    return encode(solid(size, color), fmt.upper())


def png_bytes(size: tuple[int, int] = (32, 24), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    return encode(solid(size, color), "PNG")


def jpeg_bytes(size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (30, 30, 200)) -> bytes:
    return encode(solid(size, color), "JPEG", quality=90)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A tiny PNG (written by hand) whose header claims ``width`` x ``height`` RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


class ImageHandler(JSONHandler):
    """Routes: /image.png /image.jpg /garbage /missing (404) /slow (waits for ``release``)
    /oversize (declares a huge length) /oversize-stream (chunked, no length) /redirect?to=URL /loop
    /first (waits until /second has arrived) /second."""

    release: ClassVar[threading.Event]
    second_arrived: ClassVar[threading.Event]

    def do_GET(self) -> None:
        self.read_body()  # records the request
        parts = urlsplit(self.path)
        route = parts.path
        if route == "/image.png":
            self.send_bytes(200, png_bytes(), "image/png")
        elif route == "/image.jpg":
            self.send_bytes(200, jpeg_bytes(), "image/jpeg")
        elif route == "/garbage":
            self.send_bytes(200, b"<html>this is not an image</html>", "image/png")
        elif route == "/missing":
            self.send_bytes(404, b"not found", "text/plain")
        elif route == "/slow":
            self.release.wait(HANDLER_WAIT_S)
            self._send_quietly(png_bytes())
        elif route == "/oversize":
            self._send_declared_oversize()
        elif route == "/oversize-stream":
            self._send_chunked([b"\x00" * 1024] * (OVERSIZE_BYTES // 1024))
        elif route == "/redirect":
            target = parse_qs(parts.query)["to"][0]
            self.send_bytes(302, b"", "text/plain", {"Location": target})
        elif route == "/loop":
            self.send_bytes(302, b"", "text/plain", {"Location": "/loop"})
        elif route == "/first":
            arrived = self.second_arrived.wait(HANDLER_WAIT_S)
            self._send_quietly(png_bytes((8, 8), (255, 0, 0)) if arrived else b"")
        elif route == "/second":
            self.second_arrived.set()
            self.send_bytes(200, jpeg_bytes((16, 16), (0, 0, 255)), "image/jpeg")
        else:
            self.send_bytes(404, b"no such route", "text/plain")

    def _send_quietly(self, body: bytes) -> None:
        # The client may have given up (timeouts are under test); a closed socket is expected.
        try:
            self.send_bytes(200 if body else 504, body, "image/png")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send_declared_oversize(self) -> None:
        # Declares far more than it sends: only a Content-Length check refuses it at once;
        # a client that reads on sees the connection close early.
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(1024 * OVERSIZE_BYTES))
        self.end_headers()
        try:
            self.wfile.write(b"\x00" * 1024)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True

    def _send_chunked(self, chunks: list[bytes]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in chunks:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass


@dataclass
class FakeImageServer:
    base_url: str
    recorder: Recorder
    handler: type[ImageHandler]

    @property
    def release(self) -> threading.Event:
        return self.handler.release

    def reset(self) -> None:
        """Forget recorded requests and re-arm the events (for a server shared by tests)."""
        with self.recorder.lock:
            self.recorder.requests.clear()
        self.handler.release.clear()
        self.handler.second_arrived.clear()

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    @property
    def paths(self) -> list[str]:
        with self.recorder.lock:
            return [request.path for request in self.recorder.requests]


@contextmanager
def serve_images() -> Iterator[FakeImageServer]:
    """A fresh ``ImageHandler`` server (own recorder and events) on 127.0.0.1:0."""
    log = Recorder()

    class BoundImageHandler(ImageHandler):
        recorder = log
        release = threading.Event()
        second_arrived = threading.Event()

    with serve_in_thread(BoundImageHandler) as base_url:
        try:
            yield FakeImageServer(base_url, log, BoundImageHandler)
        finally:
            BoundImageHandler.release.set()
