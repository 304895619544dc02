"""Runware task bodies and response parsing (API_CONTRACTS.md section 7).

A request is a JSON array of tasks; an answer is ``{"data": [...], "errors": [...]}`` where
each item names the ``taskUUID`` it belongs to, so several tasks (and partial failures) can
share one answer. Pure functions: the generator does the I/O.
"""

from __future__ import annotations

import base64
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from image_server.errors import ContentPolicy, GenerationFailed, InvalidRequest
from image_server.generators.base import RenderJob
from image_server.generators.http import error_for_status, scrub
from image_server.generators.runware.config import AIR_PATTERN, RunwareConfig

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPG", "webp": "WEBP"}
RESULT_KEYS = {"URL": "imageURL", "base64Data": "imageBase64Data", "dataURI": "imageDataURI"}
AIR = re.compile(AIR_PATTERN)
MAX_DETAIL_CHARS = 300
# Error codes whose meaning the HTTP status of a 200 answer cannot carry (per-task errors).
CODE_STATUS = {"invalidApiKey": 401, "insufficientCredits": 402, "timeoutProvider": 504}
CODE_WORDING = (
    (re.compile(r"api.?key|unauthori[sz]ed|authenticat", re.IGNORECASE), 401),
    (re.compile(r"credit|balance|payment", re.IGNORECASE), 402),
    (re.compile(r"rate.?limit|too many|concurren", re.IGNORECASE), 429),
    (re.compile(r"timeout|timed out", re.IGNORECASE), 504),
)
POLICY_WORDING = re.compile(r"nsfw|content.?(policy|moderation|filter)|safety|inappropriate", re.IGNORECASE)


def new_task_uuid() -> str:
    return str(uuid.uuid4())


@dataclass
class Built:
    task: dict[str, Any]
    applied: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def snap(value: int, config: RunwareConfig) -> int:
    """The nearest multiple of ``size_multiple`` within the configured bounds."""
    multiple = config.size_multiple
    snapped = round(value / multiple) * multiple
    low = -(-config.min_size // multiple) * multiple  # the smallest multiple >= min_size
    high = config.max_size // multiple * multiple
    return max(low, min(high, snapped))


def build_task(
    job: RenderJob, config: RunwareConfig, *, ignored: list[str], images: list[str], output_type: str, generator: str
) -> Built:
    """The ``imageInference`` task. ``images`` are the references as Runware takes them
    (imageUUIDs from ``imageUpload``, or data URIs)."""
    request = job.request
    width = snap(request.width or config.width, config)
    height = snap(request.height or config.height, config)
    task: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": new_task_uuid(),
        "model": config.model,
        "positivePrompt": request.prompt,
        "width": width,
        "height": height,
        "numberResults": request.num_images,
        "outputType": output_type,
        "outputFormat": OUTPUT_FORMATS[request.output_format],
        "deliveryMethod": config.delivery_method,
    }
    built = Built(task, {"model": config.model, "width": width, "height": height}, list(ignored))
    if request.negative_prompt is not None:
        task["negativePrompt"] = request.negative_prompt
    optional = {
        "steps": request.steps if request.steps is not None else config.steps,
        "CFGScale": request.guidance_scale if request.guidance_scale is not None else config.cfg_scale,
        "seed": request.seed,
        "scheduler": config.scheduler,
        "outputQuality": config.output_quality,
    }
    names = {"steps": "steps", "CFGScale": "guidance_scale", "seed": "seed", "scheduler": "scheduler"}
    for key, value in optional.items():
        if value is not None:
            task[key] = value
            if key in names:
                built.applied[names[key]] = value
    if images and config.reference_mode == "seed_image":
        task["seedImage"] = images[0]
        strength = request.strength if request.strength is not None else config.strength
        if strength is not None:
            task["strength"] = built.applied["strength"] = strength
    elif images:
        task["referenceImages"] = images
        if request.strength is not None:
            built.ignored.append("strength")  # reference images have no strength
    elif request.strength is not None:
        built.ignored.append("strength")
    if images:
        built.applied["reference_images"] = len(images)
    if request.loras and config.loras:  # otherwise check_request listed them in ignored
        task["lora"] = built.applied["lora"] = loras_of(job, generator=generator)
    if config.check_nsfw:
        task["checkNSFW"] = True
    task.update(config.arguments)
    return built


def loras_of(job: RenderJob, *, generator: str) -> list[dict[str, Any]]:
    """Request LoRAs as Runware's ``lora`` list; names must be AIR ids."""
    bad = [lora.name for lora in job.request.loras if not AIR.match(lora.name)]
    if bad:
        raise InvalidRequest(
            f"{generator}: Runware takes LoRAs as AIR ids (source:id@version); not: {', '.join(bad)[:200]}",
            generator=generator,
        )
    return [{"model": lora.name, "weight": lora.strength} for lora in job.request.loras]


def upload_tasks(data_uris: list[str]) -> list[dict[str, Any]]:
    return [{"taskType": "imageUpload", "taskUUID": new_task_uuid(), "image": uri} for uri in data_uris]


def data_uri(data: bytes, mime: str) -> str:
    """Blocking for big images: call in a thread."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def items_for(payload: Any, task_uuid: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(data items, errors) of one task; errors without a taskUUID (auth, a malformed body) count too."""
    body = payload if isinstance(payload, dict) else {}
    data = body.get("data")
    errors = body.get("errors")
    data = data if isinstance(data, list) else []
    errors = errors if isinstance(errors, list) else []
    mine = [item for item in data if isinstance(item, dict) and item.get("taskUUID") == task_uuid]
    failed = [e for e in errors if isinstance(e, dict) and e.get("taskUUID") in (task_uuid, None)]
    return mine, failed


def runware_error(status: int, errors: list[dict[str, Any]], fallback: str, *, generator: str, key: str,
                  retry_after: float | None = None) -> GenerationFailed:  # fmt: skip
    """Our error for an HTTP failure or a task's ``errors`` entries (status 200 = per task)."""
    codes = [str(e.get("code")) for e in errors if e.get("code")]
    text = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors) or fallback
    detail = scrub(text, key)[:MAX_DETAIL_CHARS]  # scrub, then cut
    error_type = codes[0] if codes else None
    if POLICY_WORDING.search(text):
        return ContentPolicy(
            f"{generator}: refused by Runware's content filter: {detail}",
            status=status if status >= 400 else None,
            error_type=error_type,
            generator=generator,
        )
    if status < 400:
        status = next((CODE_STATUS[c] for c in codes if c in CODE_STATUS), 0) or _status_by_wording(text)
    return error_for_status(status, detail, generator=generator, retry_after=retry_after, error_type=error_type)


def _status_by_wording(text: str) -> int:
    return next((status for pattern, status in CODE_WORDING if pattern.search(text)), 400)


@dataclass(frozen=True)
class Result:
    encoded: str  # a URL, raw base64 or a data URI, as ``kind`` says
    kind: str
    seed: int | None
    nsfw: bool


def read_results(items: list[dict[str, Any]], *, generator: str) -> list[Result]:
    """The image of each ``imageInference`` item (whichever output key it carries)."""
    results = []
    for item in items:
        found = [(kind, item[key]) for kind, key in RESULT_KEYS.items() if isinstance(item.get(key), str)]
        if not found:
            raise GenerationFailed(f"{generator}: a Runware result has no image", generator=generator)
        kind, encoded = found[0]
        seed = item.get("seed")
        seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
        results.append(Result(encoded, kind, seed, item.get("NSFWContent") is True))
    return results
