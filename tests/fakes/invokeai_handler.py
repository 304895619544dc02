"""HTTP routes of the fake InvokeAI (the state and queue logic live in ``tests.fakes.invokeai``)."""

from __future__ import annotations

import io
import json
import re
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from PIL import Image, UnidentifiedImageError

from tests.fakes.multipart import parse_multipart
from tests.fakes.server import JSONHandler

if TYPE_CHECKING:
    from tests.fakes.invokeai import FakeInvokeAI

CATEGORIES = {"user", "general", "control", "mask", "other"}
QUEUE = "/api/v1/queue/default"
ITEM = re.compile(rf"^{QUEUE}/i/(\d+)(/cancel)?$")
IMAGE = re.compile(r"^/api/v1/images/i/([^/]+)/full$")


def missing(*loc: str) -> dict[str, Any]:
    return {"detail": [{"loc": list(loc), "msg": "Field required", "type": "missing"}]}


class InvokeAIHandler(JSONHandler):
    fake: FakeInvokeAI

    def _route(self) -> tuple[str, dict[str, list[str]], bytes] | None:
        body = self.read_body()
        parts = urlsplit(self.path)
        if self.fake.token is not None and self.headers.get("Authorization") != f"Bearer {self.fake.token}":
            self.send_json(401, {"detail": "Not authenticated"})
            return None
        return parts.path, parse_qs(parts.query), body

    def _garbage(self, route: str) -> bool:
        if route in self.fake.nonsense:
            self.send_bytes(200, b'{"hello": "this is not InvokeAI"', "application/json")
            return True
        return False

    def do_GET(self) -> None:
        routed = self._route()
        if routed is None:
            return
        path, query, _ = routed
        fake = self.fake
        if path == "/api/v1/app/version":
            self.send_json(200, {"version": fake.version, "highlights": []})
        elif path == "/api/v2/models/":
            if not self._garbage("models"):
                self.send_json(200, {"models": fake.models.search(query)})
        elif path == "/api/v1/boards/":
            with fake.lock:
                boards = [{"board_id": b, "board_name": n, "archived": False} for b, n in fake.boards.items()]
            self.send_json(200, boards if query.get("all") == ["true"] else {"items": boards, "total": len(boards)})
        elif (match := ITEM.match(path)) and not match.group(2):
            if self._garbage("item"):
                return
            item = fake.read_item(int(match.group(1)))
            if item is None:
                self.send_json(404, {"detail": f"Queue item with id {match.group(1)} not found in queue default"})
            else:
                self.send_json(200, item)
        elif path == f"{QUEUE}/list" and int(fake.version.split(".")[0]) < 6:
            self.send_json(200, fake.queue_page(query))
        elif match := IMAGE.match(path):
            image = fake.images.get(unquote(match.group(1)))
            if "image" in fake.nonsense:
                self.send_bytes(200, b"<html>a login page</html>", "image/png")
            elif image is None:
                self.send_json(404, {"detail": "Image not found"})
            else:
                self.send_bytes(200, image["data"], "image/png")
        else:
            self.send_json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        routed = self._route()
        if routed is None:
            return
        path, query, body = routed
        fake = self.fake
        if path == f"{QUEUE}/enqueue_batch":
            if self._garbage("enqueue"):
                return
            try:
                payload = json.loads(body)
            except ValueError:
                self.send_json(422, {"detail": [{"loc": ["body"], "msg": "JSON decode error", "type": "json_invalid"}]})
                return
            self.send_json(*fake.enqueue(payload))
        elif path == "/api/v1/images/upload":
            self._upload(query, body)
        elif path == "/api/v1/boards/":
            if "board_name" not in query:
                self.send_json(422, missing("query", "board_name"))
                return
            board_id = str(uuid.uuid4())
            with fake.lock:
                fake.boards[board_id] = query["board_name"][0]
            self.send_json(201, {"board_id": board_id, "board_name": query["board_name"][0], "image_count": 0})
        else:
            self.send_json(404, {"detail": "Not Found"})

    def _upload(self, query: dict[str, list[str]], body: bytes) -> None:
        for name in ("image_category", "is_intermediate"):
            if name not in query:
                self.send_json(422, missing("query", name))
                return
        if query["image_category"][0] not in CATEGORIES:
            self.send_json(
                422, {"detail": [{"loc": ["query", "image_category"], "msg": "Input should be 'user', ..."}]}
            )
            return
        try:
            _, files = parse_multipart(body, self.headers.get("Content-Type", ""))
            (upload,) = [f for f in files if f.field == "file"]
        except ValueError:
            self.send_json(422, missing("body", "file"))
            return
        if not upload.content_type.startswith("image"):
            self.send_json(415, {"detail": "Not an image"})
            return
        try:
            with Image.open(io.BytesIO(upload.data)) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError):
            self.send_json(415, {"detail": "Failed to read image"})
            return
        name = f"{uuid.uuid4()}.png"
        intermediate = query["is_intermediate"][0] == "true"
        with self.fake.lock:
            self.fake.images[name] = {"data": upload.data, "board_id": None, "is_intermediate": intermediate}
        dto = {"image_name": name, "image_url": f"api/v1/images/i/{name}/full", "width": width, "height": height}
        dto |= {"image_category": query["image_category"][0], "is_intermediate": intermediate, "board_id": None}
        self.send_json(201, dto)

    def do_PUT(self) -> None:
        routed = self._route()
        if routed is None:
            return
        path, _, body = routed
        if (match := ITEM.match(path)) and match.group(2):
            item = self.fake.cancel(int(match.group(1)))
            if item is None:
                self.send_json(404, {"detail": f"Queue item with id {match.group(1)} not found in queue default"})
            else:
                self.send_json(200, item)
        elif path == f"{QUEUE}/cancel_by_batch_ids":
            batch_ids = json.loads(body).get("batch_ids", [])
            with self.fake.lock:
                ids = [i.item_id for i in self.fake.items.values() if i.batch_id in batch_ids]
            canceled = [self.fake.cancel(item_id) for item_id in ids]
            self.send_json(200, {"canceled": len(canceled)})
        else:
            self.send_json(404, {"detail": "Not Found"})
