"""worker-comfyui jobs: the request body (with references within RunPod's payload limit) and the
job object (status, output images, errors), per API_CONTRACTS.md section 10. Blocking: threads."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from image_server.errors import GenerationFailed, ReferenceImageError
from image_server.generators.base import ReferenceImage
from image_server.generators.http import decode_base64_image
from image_server.generators.workflow import Graph

TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
MAX_DETAIL_CHARS = 300


def poll_delays(first: float, backoff: float, maximum: float) -> Iterator[float]:
    """Waits before each /status poll: ``first``, growing by ``backoff``, capped at ``maximum``."""
    delay = min(first, maximum)
    while True:
        yield delay
        delay = min(delay * backoff, maximum)


def reference_name(request_id: str, index: int, fmt: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in request_id)[:64]
    return f"image_server_{safe}_{index}.{fmt}"


def job_body(graph: Graph, images: list[tuple[str, bytes]]) -> bytes:
    payload = {"workflow": graph, "images": [{"name": n, "image": base64.b64encode(d).decode()} for n, d in images]}
    return json.dumps({"input": payload}).encode()


def fit_payload(
    graph: Graph, references: list[tuple[str, ReferenceImage]], *, limit: int, shrink: bool, generator: str
) -> tuple[bytes, list[str]]:
    """The job body within ``limit`` bytes, and the names of the references shrunk to get there.

    Shrinking re-encodes every reference as JPEG, at full size first, then halving the sides.
    (ComfyUI's LoadImage reads the content, so a name ending in .png may hold a JPEG.)
    """
    body = job_body(graph, [(name, ref.data) for name, ref in references])
    shrunk: list[str] = []
    scale = 1.0
    while len(body) > limit and shrink and references and scale >= 1 / 64:
        body = job_body(graph, _shrunk(references, scale))
        shrunk = [name for name, _ in references]
        scale /= 2
    if len(body) > limit:
        sizes = ", ".join(f"{name} {len(ref.data)} bytes" for name, ref in references) or "no references"
        raise ReferenceImageError(
            f"{generator}: the job is {len(body)} bytes, over the {limit}-byte RunPod payload limit ({sizes})"
            + ("" if shrink else "; set shrink_references = true to downscale them"),
            generator=generator,
        )
    return body, shrunk


def _shrunk(references: list[tuple[str, ReferenceImage]], scale: float) -> list[tuple[str, bytes]]:
    from PIL import Image

    out = []
    for name, ref in references:
        with Image.open(io.BytesIO(ref.data)) as opened:
            image = opened.convert("RGB")
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        out.append((name, buffer.getvalue()))
    return out


@dataclass
class Job:
    id: str
    status: str
    output: Any = None
    error: Any = None
    delay_ms: float | None = None
    execution_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def parse_job(content: bytes, *, generator: str) -> Job:
    try:
        body = json.loads(content)
    except ValueError as exc:
        raise GenerationFailed(f"{generator}: RunPod answered with malformed JSON", generator=generator) from exc
    if not isinstance(body, dict) or not isinstance(body.get("id"), str) or not isinstance(body.get("status"), str):
        raise GenerationFailed(f"{generator}: RunPod answered without a job id and status", generator=generator)

    def ms(key: str) -> float | None:
        value = body.get(key)
        return float(value) if isinstance(value, int | float) else None

    return Job(body["id"], body["status"], body.get("output"), body.get("error"), ms("delayTime"), ms("executionTime"))


def error_text(error: Any, output: Any = None) -> str:
    """A FAILED job's reason: ``error`` (a string, or a JSON blob of an uncaught exception whose
    traceback must not leak) and worker-comfyui's ``details`` list where RunPod passed it on."""
    text = _error_of(error)
    details = output.get("details") if isinstance(output, dict) else None
    if isinstance(details, list) and details:
        text = f"{text}: {'; '.join(str(d) for d in details)}"
    return text[:MAX_DETAIL_CHARS]


def _error_of(error: Any) -> str:
    if isinstance(error, str):
        try:
            parsed = json.loads(error)
        except ValueError:
            return error
        if not isinstance(parsed, dict):
            return error
        error = parsed
    if isinstance(error, dict):
        kind, message = error.get("error_type"), error.get("error_message") or error.get("message")
        if message:
            return f"{kind}: {message}" if kind else str(message)
    return "no reason given"


@dataclass(frozen=True)
class OutputImage:
    data: bytes | None
    url: str | None


def output_images(output: Any, *, generator: str) -> list[OutputImage]:
    """``output.images`` (base64 or s3_url) of worker-comfyui 5.x, or a legacy ``output.message``."""
    if not isinstance(output, dict):
        raise GenerationFailed(f"{generator}: the RunPod job completed without an output object", generator=generator)
    if output.get("status") == "success_no_images":
        raise GenerationFailed(f"{generator}: the workflow ran but produced no images", generator=generator)
    images = output.get("images")
    if images is None and isinstance(output.get("message"), str):  # worker-comfyui < 5
        message = output["message"]
        if message.startswith(("http://", "https://")):
            return [OutputImage(None, message)]
        return [OutputImage(decode_base64_image(message.partition(",")[2] or message, generator=generator), None)]
    if not isinstance(images, list) or not images:
        raise GenerationFailed(f"{generator}: the RunPod job completed without output.images", generator=generator)
    found = []
    for image in images:
        if not isinstance(image, dict) or not isinstance(image.get("data"), str):
            raise GenerationFailed(f"{generator}: an output image without data", generator=generator)
        if image.get("type") == "s3_url":
            found.append(OutputImage(None, image["data"]))
        else:
            found.append(OutputImage(decode_base64_image(image["data"], generator=generator), None))
    return found
