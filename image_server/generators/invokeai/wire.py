"""InvokeAI response parsing: models, uploads, boards, enqueue results and queue items.

Every parser takes decoded JSON and raises ``GenerationFailed`` naming what was wrong when
the server answers with a shape InvokeAI never sends, so nonsense never becomes a KeyError.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from image_server.errors import GenerationFailed
from image_server.generators.invokeai.graph import OUTPUT_NODE, ModelRef

MAX_DETAIL_CHARS = 500
TERMINAL = frozenset({"completed", "failed", "canceled"})
KNOWN_STATUSES = TERMINAL | {"pending", "in_progress", "waiting"}


@dataclass(frozen=True)
class OutputImage:
    image_name: str
    width: int | None
    height: int | None


@dataclass(frozen=True)
class QueueItem:
    item_id: int
    status: str
    error_type: str | None = None
    error_message: str | None = None
    images: list[OutputImage] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


class Malformed(GenerationFailed):
    """The server answered with something InvokeAI would not send."""


def malformed(generator: str, what: str) -> Malformed:
    return Malformed(f"{generator}: InvokeAI answered {what}", generator=generator, error_type="malformed_response")


def decode_json(content: bytes, *, generator: str, what: str) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        raise malformed(generator, f"the {what} with a body that is not JSON") from None


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def clip(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def detail_of(payload: Any) -> str:
    """FastAPI's ``{"detail": "text"}`` or ``{"detail": [{"loc", "msg", "type"}]}`` as one line."""
    detail = as_dict(payload).get("detail", payload)
    if isinstance(detail, list):
        parts = []
        for item in detail:
            item = as_dict(item)
            loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
            parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
        return "; ".join(parts)
    return "" if detail is None else str(detail)


def parse_models(payload: Any, *, generator: str) -> list[ModelRef]:
    """``{"models": [config, ...]}`` from ``GET /api/v2/models/``."""
    models = as_dict(payload).get("models")
    if not isinstance(models, list):
        raise malformed(generator, "a model list without 'models'")
    refs = []
    for entry in models:
        entry = as_dict(entry)
        key, name, base, kind = (entry.get(k) for k in ("key", "name", "base", "type"))
        if not all(isinstance(v, str) and v for v in (key, name, base, kind)):
            raise malformed(generator, "a model record without key, name, base and type")
        variant = entry.get("variant")
        refs.append(
            ModelRef(
                key=str(key),
                hash=str(entry.get("hash") or ""),
                name=str(name),
                base=str(base),
                type=str(kind),
                variant=variant if isinstance(variant, str) else None,
                defaults=as_dict(entry.get("default_settings")),
            )
        )
    return refs


def parse_image_name(payload: Any, *, generator: str) -> str:
    """The ``image_name`` of an ImageDTO (upload answer)."""
    name = as_dict(payload).get("image_name")
    if not isinstance(name, str) or not name:
        raise malformed(generator, "an upload without an image_name")
    return name


def parse_boards(payload: Any, *, generator: str) -> dict[str, str]:
    """board_name -> board_id from ``GET /api/v1/boards/?all=true`` (a list; paginated: ``items``)."""
    boards = payload if isinstance(payload, list) else as_dict(payload).get("items")
    if not isinstance(boards, list):
        raise malformed(generator, "a board list that is not a list")
    found: dict[str, str] = {}
    for board in map(as_dict, boards):
        name, board_id = board.get("board_name"), board.get("board_id")
        if isinstance(name, str) and isinstance(board_id, str):
            found.setdefault(name, board_id)  # the first of two same-named boards wins, every time
    return found


def parse_board_id(payload: Any, *, generator: str) -> str:
    board_id = as_dict(payload).get("board_id")
    if not isinstance(board_id, str) or not board_id:
        raise malformed(generator, "a created board without a board_id")
    return board_id


def parse_enqueue(payload: Any, *, generator: str) -> tuple[str, list[int] | None]:
    """(batch_id, item_ids); ``item_ids`` is None from servers before 6.0, which do not send it."""
    batch_id = as_dict(as_dict(payload).get("batch")).get("batch_id")
    if not isinstance(batch_id, str) or not batch_id:
        raise malformed(generator, "an enqueue result without batch.batch_id")
    item_ids = as_dict(payload).get("item_ids")
    if item_ids is None:
        return batch_id, None
    if not isinstance(item_ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in item_ids):
        raise malformed(generator, "an enqueue result whose item_ids are not integers")
    return batch_id, item_ids


def parse_queue_page(payload: Any, *, generator: str) -> tuple[list[tuple[int, str, int]], bool]:
    """((item_id, batch_id, priority), ...) and has_more from the cursor-paginated ``/list`` (v4/v5)."""
    page = as_dict(payload)
    items = page.get("items")
    if not isinstance(items, list):
        raise malformed(generator, "a queue list without items")
    rows = []
    for item in map(as_dict, items):
        item_id, batch_id = item.get("item_id"), item.get("batch_id")
        if isinstance(item_id, int) and isinstance(batch_id, str):
            priority = item.get("priority")
            rows.append((item_id, batch_id, priority if isinstance(priority, int) else 0))
    return rows, bool(page.get("has_more"))


def parse_queue_item(payload: Any, *, generator: str) -> QueueItem:
    """A SessionQueueItem; for a completed one, the images of the graph's output node."""
    item = as_dict(payload)
    item_id, status = item.get("item_id"), item.get("status")
    if not isinstance(item_id, int) or status not in KNOWN_STATUSES:
        raise malformed(generator, f"a queue item with item_id {item_id!r} and status {status!r}")
    images = _output_images(as_dict(item.get("session")), generator) if status == "completed" else []
    error_type, error_message = item.get("error_type"), item.get("error_message")
    return QueueItem(
        item_id=item_id,
        status=str(status),
        error_type=error_type if isinstance(error_type, str) else None,
        error_message=error_message if isinstance(error_message, str) else None,
        images=images,
    )


def _output_images(session: Mapping[str, Any], generator: str) -> list[OutputImage]:
    """``results`` of the prepared nodes made from ``OUTPUT_NODE`` (other image nodes, such as the
    resized init image, are intermediates and not ours to return)."""
    results = as_dict(session.get("results"))
    prepared = as_dict(session.get("source_prepared_mapping")).get(OUTPUT_NODE)
    if not isinstance(prepared, list):
        back = as_dict(session.get("prepared_source_mapping"))
        prepared = [node for node, source in back.items() if source == OUTPUT_NODE]
    images = []
    for node_id in prepared:
        result = as_dict(results.get(node_id))
        name = as_dict(result.get("image")).get("image_name")
        if result.get("type") != "image_output" or not isinstance(name, str) or not name:
            continue
        width, height = result.get("width"), result.get("height")
        images.append(
            OutputImage(name, width if isinstance(width, int) else None, height if isinstance(height, int) else None)
        )
    if not images:
        raise malformed(generator, "a completed queue item without an image from the output node")
    return images


def failure_text(item: QueueItem) -> str:
    """``<error_type>: <error_message>`` of a failed item; never its traceback."""
    kind = item.error_type or "error"
    message = (item.error_message or "").strip() or "no message"
    return clip(f"{kind}: {message}")
