"""Output storage: encode per request, write atomically, shape each ``OutputImage``.

Everything here is blocking (encoding, hashing, file I/O); the service calls
``OutputStore.store`` on a worker thread.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image

from image_server.encoding import encode_lossy, encode_png
from image_server.errors import StorageFailed
from image_server.formats import image_format_of
from image_server.generators.base import GeneratedImage
from image_server.pngtext import insert_text
from schemas import DeliveryMode, OutputFormat, OutputImage, RenderRequest

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# Below this, storing images that arrive encoded and leave as frames or inline data (hash,
# size from the header, PNG text chunks) takes tens of microseconds: less than a thread hop.
QUICK_STORE_BYTES = 32 * 1024


@dataclass(frozen=True)
class StoredImage:
    output: OutputImage
    blob: bytes | None = None  # raw bytes to send as an extra frame (delivery "frames")


@dataclass(frozen=True)
class Placement:
    """Where one image of a request goes: its file name parts, or its frame index."""

    request_id: str
    project: str
    generator: str
    index: int  # among the request's images
    frame: int  # among the images sent as raw frames


@dataclass(frozen=True)
class _Encoded:
    data: bytes
    width: int
    height: int


def _safe_component(value: str, what: str) -> str:
    # The schema already restricts these names; this is the last line before the filesystem.
    if not value or value.startswith(".") or "/" in value or "\\" in value or "\x00" in value:
        raise ValueError(f"unsafe {what} for a path component: {value!r}")
    return value


_PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def file_stem(request_id: str) -> str:
    """The request id as a file name that cannot surprise: as it is when it starts with a
    letter or digit and holds only those, ``.``, ``_`` and ``-``; otherwise its letters,
    digits, ``_`` and ``-`` with a hash of the whole id, so ``..``, ``.x`` or ``a:b`` give
    neither hidden files, nor names made of dots, nor colons, nor collisions."""
    if _PLAIN_ID.fullmatch(request_id):
        return request_id
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", request_id).strip("_-") or "id"
    return f"{readable}-{hashlib.sha256(request_id.encode()).hexdigest()[:10]}"


class OutputStore:
    def __init__(self, output_dir: Path, *, png_compress_level: int = 1) -> None:
        # Resolved once: the paths in ImageReady are absolute without a resolve per file (a
        # symlinked output_dir is followed at start; re-pointing it needs a restart).
        self.output_dir = Path(output_dir).resolve()
        self.png_compress_level = png_compress_level
        self._folders: set[Path] = set()  # folders known to exist

    def store(
        self,
        request: RenderRequest,
        generator: str,
        images: Sequence[GeneratedImage],
        *,
        project: str,
        parameters: Mapping[str, Any],
        now: datetime | None = None,
        delivery: DeliveryMode | None = None,
    ) -> list[StoredImage]:
        """Encode and deliver every image as ``delivery`` (default: the request's) says; a
        provider URL is passed through when the request asked for ``url`` delivery."""
        texts = {"parameters": json.dumps(dict(parameters), default=str), "prompt": request.prompt}
        folder = self._folder(project, generator, now)
        stored: list[StoredImage] = []
        for index, image in enumerate(images):
            if request.delivery == "url" and image.url is not None and image.data is None and image.image is None:
                stored.append(StoredImage(_passthrough(image)))
                continue
            fmt = request.output_format
            encoded = self._encode(image, fmt, texts)
            common: dict[str, Any] = {
                "width": encoded.width,
                "height": encoded.height,
                "format": fmt,
                "seed": image.seed,
                "sha256": hashlib.sha256(encoded.data).hexdigest(),
            }
            frame = sum(1 for item in stored if item.blob is not None)
            place = Placement(request.request_id, project, generator, index, frame)
            stored.append(self._deliver(place, delivery or request.delivery, folder, encoded.data, common))
        return stored

    def is_quick(self, request: RenderRequest, images: Sequence[GeneratedImage]) -> bool:
        """Whether ``store`` is cheap enough to run on the event loop: no file to write, no
        pixels to encode, and small images already in the requested format."""
        return request.delivery in ("frames", "inline") and all(
            image.image is None
            and image.data is not None
            and len(image.data) <= QUICK_STORE_BYTES
            and (image_format_of(image.data) or image.format) == request.output_format
            for image in images
        )

    def deliver(
        self,
        data: bytes,
        described: OutputImage,
        place: Placement,
        delivery: DeliveryMode,
        *,
        now: datetime | None = None,
    ) -> StoredImage:
        """One encoded image as ``delivery`` asks (a gateway in distributed mode calls this
        with bytes a worker rendered)."""
        common = described.model_dump(include={"width", "height", "format", "seed", "sha256"})
        return self._deliver(place, delivery, self._folder(place.project, place.generator, now), data, common)

    def deliver_encoded(
        self,
        request: RenderRequest,
        generator: str,
        images: Sequence[tuple[bytes, OutputImage]],
        *,
        project: str,
        now: datetime | None = None,
    ) -> list[StoredImage]:
        """Deliver already encoded images (a cache hit) as ``request`` asks, bytes untouched.
        Each pairs the bytes with the ``OutputImage`` that describes them (size, format, seed)."""
        folder = self._folder(project, generator, now)
        stored: list[StoredImage] = []
        for index, (data, described) in enumerate(images):
            common: dict[str, Any] = {
                "width": described.width,
                "height": described.height,
                "format": described.format,
                "seed": described.seed,
                "sha256": described.sha256 or hashlib.sha256(data).hexdigest(),
            }
            frame = sum(1 for item in stored if item.blob is not None)
            place = Placement(request.request_id, project, generator, index, frame)
            stored.append(self._deliver(place, request.delivery, folder, data, common))
        return stored

    def _folder(self, project: str, generator: str, now: datetime | None) -> Path:
        folder = self.output_dir / _safe_component(project, "project") / _safe_component(generator, "generator")
        return folder / (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%d")

    def _deliver(
        self, place: Placement, delivery: DeliveryMode, folder: Path, data: bytes, common: dict[str, Any]
    ) -> StoredImage:
        """One encoded image, delivered as ``delivery`` says (file, inline or frames)."""
        if delivery == "inline":
            return StoredImage(OutputImage(data=base64.b64encode(data).decode(), **common))
        if delivery == "frames":
            return StoredImage(OutputImage(frame=place.frame, **common), blob=data)
        name = f"{file_stem(place.request_id)}_{place.index}.{EXTENSIONS[common['format']]}"
        path = self._write(folder / name, data)
        return StoredImage(OutputImage(path=str(path), uri=path.as_uri(), **common))

    def _write(self, path: Path, data: bytes) -> Path:
        """``write_atomic`` without its per-file ``mkdir`` and ``resolve`` (eight system
        calls): ``output_dir`` is resolved once, and each folder made once unless it goes."""
        folder = path.parent
        try:
            if folder not in self._folders:
                folder.mkdir(parents=True, exist_ok=True)
                self._folders.add(folder)
            try:
                _replace_synced(path, data)
            except FileNotFoundError:  # the folder was removed while the service ran
                folder.mkdir(parents=True, exist_ok=True)
                _replace_synced(path, data)
            return path
        except OSError as exc:
            # A full disk or a read-only mount is the operator's to fix, not a bug: one clear,
            # retryable error per request instead of a traceback.
            reason = exc.strerror or type(exc).__name__
            raise StorageFailed(f"output dir {self.output_dir} not writable: {reason}") from exc

    def _encode(self, image: GeneratedImage, fmt: OutputFormat, texts: Mapping[str, str]) -> _Encoded:
        # The magic bytes beat the provider's label: a mislabelled JPEG must be re-encoded, not
        # fail in insert_text after the render was paid for.
        if image.data is not None and (image_format_of(image.data) or image.format) == fmt:
            # Fast path: the provider already sent this format; keep its bytes.
            with Image.open(io.BytesIO(image.data)) as opened:
                width, height = opened.size
            data = insert_text(image.data, texts) if fmt == "png" else image.data
            return _Encoded(data, width, height)
        if image.image is not None:
            picture = image.image
        elif image.data is not None:
            with Image.open(io.BytesIO(image.data)) as opened:
                opened.load()
                picture = opened.copy()
        else:
            raise ValueError("a generated image has neither data nor pixels")
        return _Encoded(self._encode_pixels(picture, fmt, texts), picture.width, picture.height)

    def _encode_pixels(self, picture: Image.Image, fmt: OutputFormat, texts: Mapping[str, str]) -> bytes:
        if fmt == "png":
            return encode_png(picture, texts, compress_level=self.png_compress_level)
        return encode_lossy(picture, fmt)


def _passthrough(image: GeneratedImage) -> OutputImage:
    """A provider URL handed on untouched (delivery ``url``)."""
    assert image.url is not None
    fmt = image.format
    if fmt not in EXTENSIONS:
        suffix = image.url.split("?", 1)[0].rsplit(".", 1)[-1].lower()
        fmt = {"jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}.get(suffix, "png")
    return OutputImage(uri=image.url, width=image.width or 0, height=image.height or 0, format=fmt, seed=image.seed)


def write_atomic(path: Path, data: bytes) -> Path:
    """Write via a temp file in the same folder and ``os.replace``: readers never see a
    partial image, and a crash leaves the old file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace_synced(path, data)
    return path.resolve()


def _replace_synced(path: Path, data: bytes) -> None:
    """Blocking: ``data`` fsync'd under a temp name in ``path``'s folder (which must exist),
    then renamed to ``path``. Only the system calls that need doing (open, write, fsync,
    close, rename): in the service every one of them hands the GIL over and back."""
    # Not tempfile.mkstemp: it creates files 0600, so a display process run by another user
    # could not read the image. os.open with 0o666 honours the umask instead.
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            # The journal records ImageReady right after this: the bytes must be on disk first.
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
