"""Cheap checks on the images a request carries, run before it is journaled.

A request whose embedded images are too big or not images at all would otherwise cost the
journal its megabytes before failing. Only what travels inside the message is checked
here (extra frames, base64, ``data:`` URIs): its size, and its header (format and pixel
count) without decoding. Files and URLs are checked when the request runs, as before.
Blocking: run it in a worker thread.
"""

from __future__ import annotations

from collections.abc import Sequence

from image_server.config import ReferencesConfig
from image_server.errors import ReferenceImageError
from image_server.references import decode_base64_source, open_header
from schemas import ImageSource, RenderRequest


def has_embedded_references(request: RenderRequest) -> bool:
    """Cheap, on the loop: whether there is anything here to check (most requests: no)."""
    sources = [*request.all_references(), *([request.depth_map] if request.depth_map is not None else [])]
    return any(
        source.frame is not None or source.image_data is not None or (source.uri or "").strip()[:5].lower() == "data:"
        for source in sources
    )


def precheck_embedded_references(
    request: RenderRequest, frames: Sequence[bytes | bytearray], config: ReferencesConfig
) -> None:
    """Raise ``ReferenceImageError`` (naming the image) for an embedded image that cannot pass."""
    items = [(f"reference image {index}", source) for index, source in enumerate(request.all_references())]
    if request.depth_map is not None:
        items.append(("depth map", request.depth_map))
    for label, source in items:
        try:
            data = _embedded_bytes(source, frames, config)
            if data is not None:
                open_header(data, max_pixels=config.max_pixels).close()
        except ReferenceImageError as exc:
            raise ReferenceImageError(f"{label}: {exc.message}", request_id=request.request_id) from None


def _embedded_bytes(source: ImageSource, frames: Sequence[bytes | bytearray], config: ReferencesConfig) -> bytes | None:
    if source.frame is not None:
        if source.frame >= len(frames):
            return None  # the admission check names missing frames
        frame = frames[source.frame]
        if len(frame) > config.max_bytes:
            raise ReferenceImageError(f"image frame is larger than the limit of {config.max_bytes} bytes")
        return frame if isinstance(frame, bytes) else bytes(frame)
    text = source.image_data
    if text is None and source.uri is not None and source.uri.strip()[:5].lower() == "data:":
        text = source.uri.strip()
    if text is None:
        return None
    return decode_base64_source(text, config.max_bytes)
