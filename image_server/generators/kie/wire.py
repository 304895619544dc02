"""Kie's wire format: the ``createTask`` body built from a request (with what was applied), a
``recordInfo`` record read (``resultJson`` is a JSON string inside the JSON), sizes mapped."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from image_server.errors import GenerationFailed
from image_server.generators.kie.config import KieConfig
from schemas import RenderRequest

# Each preset's width:height. "square" and "square_hd" are both 1:1; requests map to square_hd.
RATIOS: dict[str, tuple[int, int]] = {
    "square_hd": (1, 1),
    "portrait_4_3": (3, 4),
    "portrait_3_2": (2, 3),
    "portrait_16_9": (9, 16),
    "landscape_4_3": (4, 3),
    "landscape_3_2": (3, 2),
    "landscape_16_9": (16, 9),
    "landscape_21_9": (21, 9),
}
# The long side of each resolution (the contract's example: 4:3 at 4K is 4096x3072).
LONG_SIDES: dict[str, int] = {"1K": 1024, "2K": 2048, "4K": 4096}
PENDING_STATES = frozenset({"waiting", "queuing", "generating"})


def size_for(width: int, height: int) -> tuple[str, str]:
    """(image_size, image_resolution) nearest to ``width`` x ``height``: the aspect ratio closest
    on a log scale, and the smallest resolution whose long side is at least the requested one."""
    target = math.log(width / height)
    image_size = min(RATIOS, key=lambda name: abs(math.log(RATIOS[name][0] / RATIOS[name][1]) - target))
    long_side = max(width, height)
    resolution = next((name for name, side in LONG_SIDES.items() if long_side <= side), "4K")
    return image_size, resolution


@dataclass
class KieTask:
    """The ``createTask`` body and what it means for the caller."""

    body: dict[str, Any]
    prompt: str
    applied: dict[str, Any] = field(default_factory=dict)


def build_task(config: KieConfig, request: RenderRequest, image_urls: list[str]) -> KieTask:
    """The body for text-to-image, or for edit when there are ``image_urls``. Request size wins
    over the configured preset; an unset side counts as 1024, as ``RenderJob.width`` does."""
    model = config.edit_model if image_urls else config.text_model
    prompt = request.prompt
    if request.num_images > 1 and config.count_in_prompt:
        prompt = f"{prompt.rstrip()}\n\nGenerate {request.num_images} separate images."
    payload: dict[str, Any] = {"prompt": prompt}
    applied: dict[str, Any] = {"model": model}
    if image_urls:
        payload["image_urls"] = list(image_urls)
        applied["reference_images"] = len(image_urls)
    image_size: str | None = config.image_size
    resolution: str | None = config.image_resolution
    if request.width is not None or request.height is not None:
        image_size, resolution = size_for(request.width or 1024, request.height or 1024)
    if image_size is not None:
        payload["image_size"] = applied["image_size"] = image_size
    if resolution is not None:
        payload["image_resolution"] = applied["image_resolution"] = resolution
    payload["max_images"] = applied["max_images"] = request.num_images
    if request.seed is not None:
        payload["seed"] = applied["seed"] = request.seed
    if config.nsfw_checker is not None:
        payload["nsfw_checker"] = applied["nsfw_checker"] = config.nsfw_checker
    return KieTask(body={"model": model, "input": payload}, prompt=prompt, applied=applied)


def task_id_of(data: Any, *, generator: str) -> str:
    task_id = data.get("taskId") if isinstance(data, dict) else None
    if not isinstance(task_id, str) or not task_id:
        raise GenerationFailed(f"{generator}: Kie accepted the task but sent no taskId", generator=generator)
    return task_id


@dataclass(frozen=True)
class TaskRecord:
    """One ``recordInfo`` answer: the state and, once done, the result URLs or the failure."""

    state: str
    urls: tuple[str, ...] = ()
    fail_code: Any = None
    fail_message: Any = None


def read_record(data: Any, *, generator: str) -> TaskRecord:
    """``data`` of a recordInfo answer. ``resultJson`` is itself JSON, encoded as a string."""

    def malformed(reason: str) -> GenerationFailed:
        return GenerationFailed(f"{generator}: Kie returned a malformed task record: {reason}", generator=generator)

    if not isinstance(data, dict):
        raise malformed("no data")
    state = data.get("state")
    if not isinstance(state, str):
        raise malformed("no state")
    if state == "fail":
        return TaskRecord(state, fail_code=data.get("failCode"), fail_message=data.get("failMsg"))
    if state != "success":
        return TaskRecord(state)
    raw = data.get("resultJson")
    try:
        result = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        raise malformed("resultJson is not JSON") from None
    urls = result.get("resultUrls") if isinstance(result, dict) else None
    if not isinstance(urls, list) or not urls:
        raise malformed("no resultUrls")
    if not all(isinstance(url, str) and url.startswith(("https://", "http://")) for url in urls):
        raise malformed("a result URL is not an http(s) URL")
    return TaskRecord(state, urls=tuple(urls))
