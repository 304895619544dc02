"""ComfyUI responses and websocket messages -> our types and errors (API_CONTRACTS.md section 8)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from image_server.errors import GenerationFailed, ImageServerError, InvalidRequest

MAX_DETAIL_CHARS = 300


@dataclass(frozen=True)
class OutputFile:
    """One image a node wrote, as ``/view`` wants it."""

    filename: str
    subfolder: str
    type: str

    @property
    def query(self) -> dict[str, str]:
        return {"filename": self.filename, "subfolder": self.subfolder, "type": self.type}


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _short(text: Any) -> str:
    return str(text).strip()[:MAX_DETAIL_CHARS]


def prompt_rejected(body: Any, *, generator: str) -> ImageServerError:
    """A 400 from ``POST /prompt``: name each failing node, its class and the message."""
    body = as_dict(body)
    problems = []
    for node_id, node in as_dict(body.get("node_errors")).items():
        node = as_dict(node)
        for error in node.get("errors") or []:
            error = as_dict(error)
            detail = f" ({_short(error['details'])})" if error.get("details") else ""
            problems.append(f"node {node_id} ({node.get('class_type', '?')}): {_short(error.get('message'))}{detail}")
    if not problems:
        error = as_dict(body.get("error"))
        detail = f" ({_short(error['details'])})" if error.get("details") else ""
        kind = f"{error['type']}: " if error.get("type") else ""
        problems.append(f"{kind}{_short(error.get('message') or 'no reason given')}{detail}")
    return InvalidRequest(f"{generator}: ComfyUI refused the workflow: " + "; ".join(problems), generator=generator)


def prompt_id_of(content: bytes, *, generator: str) -> str:
    try:
        prompt_id = as_dict(json.loads(content)).get("prompt_id")
    except ValueError:
        prompt_id = None
    if not isinstance(prompt_id, str) or not prompt_id:
        raise GenerationFailed(f"{generator}: ComfyUI answered /prompt without a prompt_id", generator=generator)
    return prompt_id


def uploaded_name(content: bytes, *, generator: str) -> str:
    """What a LoadImage node takes for an uploaded file: ``subfolder/name``."""
    try:
        body = as_dict(json.loads(content))
    except ValueError:
        body = {}
    name, subfolder = body.get("name"), body.get("subfolder") or ""
    if not isinstance(name, str) or not name or not isinstance(subfolder, str):
        raise GenerationFailed(f"{generator}: ComfyUI answered /upload/image without a file name", generator=generator)
    return f"{subfolder}/{name}" if subfolder else name


def files_of(outputs: dict[str, Any], nodes: tuple[str, ...]) -> list[OutputFile]:
    """Images of the output ``nodes`` (in that order) from an ``outputs`` map."""
    files = []
    for node_id in nodes:
        for image in as_dict(outputs.get(node_id)).get("images") or []:
            image = as_dict(image)
            if isinstance(image.get("filename"), str):
                files.append(
                    OutputFile(image["filename"], str(image.get("subfolder") or ""), str(image.get("type") or "output"))
                )
    return files


def execution_failed(data: dict[str, Any], *, generator: str) -> GenerationFailed:
    """``execution_error``: the exception message, never the traceback or the inputs."""
    where = f"node {data.get('node_id')} ({data.get('node_type')})"
    kind = data.get("exception_type") or "error"
    message = _short(data.get("exception_message") or "no message")
    return GenerationFailed(
        f"{generator}: ComfyUI failed in {where}: {kind}: {message}", error_type=str(kind), generator=generator
    )


def interrupted(data: dict[str, Any], *, generator: str) -> GenerationFailed:
    return GenerationFailed(
        f"{generator}: the render was interrupted on the ComfyUI server at node {data.get('node_id')} "
        f"({data.get('node_type')})",
        error_type="execution_interrupted",
        generator=generator,
        retryable=True,
    )


@dataclass(frozen=True)
class HistoryEntry:
    outputs: dict[str, Any]
    error: GenerationFailed | None


def history_entry(content: bytes, prompt_id: str, *, generator: str) -> HistoryEntry | None:
    """``GET /history/{id}``: None until the prompt has finished."""
    try:
        body = json.loads(content)
    except ValueError as exc:
        raise GenerationFailed(
            f"{generator}: ComfyUI answered /history with malformed JSON", generator=generator
        ) from exc
    if not isinstance(body, dict):
        raise GenerationFailed(f"{generator}: ComfyUI answered /history with an unexpected shape", generator=generator)
    entry = as_dict(body.get(prompt_id))
    if not entry:
        return None
    status = as_dict(entry.get("status"))
    if status.get("status_str") == "error":
        for message in status.get("messages") or []:
            if isinstance(message, list) and len(message) == 2:
                kind, data = message
                if kind == "execution_error":
                    return HistoryEntry({}, execution_failed(as_dict(data), generator=generator))
                if kind == "execution_interrupted":
                    return HistoryEntry({}, interrupted(as_dict(data), generator=generator))
        return HistoryEntry(
            {}, GenerationFailed(f"{generator}: ComfyUI reports the prompt failed", generator=generator)
        )
    if status and not status.get("completed", True):
        return None
    return HistoryEntry(as_dict(entry.get("outputs")), None)


def queue_ids(content: bytes) -> tuple[set[str], set[str]]:
    """(running, pending) prompt ids from ``GET /queue``; items are ``[number, prompt_id, ...]``."""
    body = as_dict(json.loads(content))

    def ids(items: Any) -> set[str]:
        return {
            item[1] for item in items or [] if isinstance(item, list) and len(item) > 1 and isinstance(item[1], str)
        }

    return ids(body.get("queue_running")), ids(body.get("queue_pending"))


def describe_system(content: bytes) -> str:
    """``/system_stats`` in one line: version, first device, free VRAM."""
    body = as_dict(json.loads(content))
    system = as_dict(body.get("system"))
    devices = body.get("devices") or []
    text = f"ComfyUI {system.get('comfyui_version', '?')}"
    if devices:
        device = as_dict(devices[0])
        free, total = device.get("vram_free"), device.get("vram_total")
        text += f" on {device.get('name', device.get('type', '?'))}"
        if isinstance(free, int | float) and isinstance(total, int | float) and total:
            text += f", {free / 2**30:.1f} of {total / 2**30:.1f} GiB VRAM free"
    return text
