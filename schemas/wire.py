"""Encode and decode messages as ZMQ multipart frames: ``[topic, json, *blobs]``.

For drop-in use by older clients a single frame is also accepted, holding either
``"<topic> <json>"`` or plain JSON. Nothing here imports zmq: frames are bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from schemas import lift
from schemas.messages import REQUEST_ID_PATTERN, Message

MESSAGE_ADAPTER: TypeAdapter[Any] = TypeAdapter(Message)

# Frames as they come: bytes, or a bytearray for a big frame copied out of libzmq in chunks.
Buffer = bytes | bytearray | memoryview
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
_SNIFFED = {"request_id": _REQUEST_ID, "reply_to": _NAME}
_TOPIC = re.compile(r"^[A-Za-z]+(/[A-Za-z0-9._-]{1,64})?$")
# Deeper JSON is refused: json.loads raises RecursionError past ~1000 levels, and pydantic
# cannot serialize (journal, echo in events) past ~255, so such a request would be stranded.
MAX_JSON_DEPTH = 64
# Up to this size a payload's brackets are counted before its parsed JSON is walked.
BRACKET_COUNT_BYTES = 64 * 1024


class WireError(ValueError):
    """A message that could not be decoded; ``request_id`` is set when one could be read."""

    def __init__(
        self,
        reason: str,
        *,
        request_id: str | None = None,
        topic: str | None = None,
        reply_to: str | None = None,
        code: str = "invalid_request",
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code  # the RenderError code: prompt_too_long for a prompt over the hard limit
        self.request_id = request_id
        self.topic = topic
        self.reply_to = reply_to


@dataclass(frozen=True)
class DecodedMessage:
    topic: str
    message: Any
    blobs: Sequence[Buffer] = field(default_factory=tuple)
    payload: bytes | bytearray = b""  # the JSON as received (journaled as is: no re-serialization)


def event_topic(message_type: str, reply_to: str | None = None) -> str:
    """``Type`` or ``Type/<reply_to>`` so a client can subscribe to its own events only."""
    return f"{message_type}/{reply_to}" if reply_to else message_type


def encode_message(message: BaseModel, *, reply_to: str | None = None, blobs: Sequence[bytes] = ()) -> list[bytes]:
    """``[topic, json, *blobs]`` for a model that has a ``type`` field."""
    message_type = type(message).model_fields["type"].default
    return [event_topic(message_type, reply_to).encode("ascii"), message.model_dump_json().encode(), *blobs]


def sniff_field(payload: bytes | bytearray, name: str = "request_id") -> str | None:
    """Best effort: read a valid ``request_id`` or ``reply_to`` out of a message that failed
    to decode (invalid JSON, a schema violation, a truncated or oversized body)."""
    pattern = _SNIFFED[name]
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        data = None
    if isinstance(data, dict):
        value = data.get(name)
        return value if isinstance(value, str) and pattern.match(value) else None
    found = re.search(rb'"' + name.encode() + rb'"\s*:\s*"([A-Za-z0-9._:-]{1,128})"', payload)
    value = found.group(1).decode() if found else None
    return value if value is not None and pattern.match(value) else None


def sniff_request_id(payload: bytes | bytearray) -> str | None:
    return sniff_field(payload, "request_id")


def _wire_error(reason: str, payload: bytes | bytearray, topic: str | None = None) -> WireError:
    return WireError(
        reason, request_id=sniff_request_id(payload), topic=topic, reply_to=sniff_field(payload, "reply_to")
    )


def _split_single_frame(frame: bytes | bytearray) -> tuple[str | None, bytes | bytearray]:
    stripped = frame.lstrip()
    if stripped.startswith(b"{"):
        return None, stripped
    topic, sep, rest = stripped.partition(b" ")
    if not sep:
        raise _wire_error("single frame is neither JSON nor '<topic> <json>'", frame)
    return _decode_topic(topic, rest), rest


def _decode_topic(raw: bytes | bytearray, payload: bytes | bytearray) -> str:
    try:
        topic = raw.decode("ascii")
    except UnicodeDecodeError:
        topic = ""
    if not _TOPIC.match(topic):
        raise _wire_error("topic is not a message type", payload)
    return topic


def _as_bytes(frame: Buffer) -> bytes | bytearray:
    # A bytearray (a big frame copied out of libzmq in chunks) is used as it is: copying it
    # again into bytes would hold the GIL for the whole size. bytes and bytearray share the
    # methods used here (find, slicing, json.loads).
    return frame if isinstance(frame, bytes | bytearray) else bytes(frame)


def decode_frames(frames: Sequence[Buffer]) -> DecodedMessage:
    """Decode one received message; raise ``WireError`` (with any readable request_id)."""
    if not frames:
        raise WireError("empty message")
    if len(frames) == 1:
        topic, payload = _split_single_frame(_as_bytes(frames[0]))
        blobs: Sequence[Buffer] = ()
    else:
        payload = _as_bytes(frames[1])
        topic = _decode_topic(bytes(frames[0]), payload)
        blobs = frames[2:]
    try:
        data = lift.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _wire_error(f"invalid JSON: {exc}", payload, topic) from exc
    except RecursionError as exc:
        raise _wire_error(f"JSON is nested deeper than {MAX_JSON_DEPTH} levels", payload, topic) from exc
    if _may_be_too_deep(payload) and _too_deep(data):
        raise _wire_error(f"JSON is nested deeper than {MAX_JSON_DEPTH} levels", payload, topic)
    if not isinstance(data, dict):
        raise _wire_error("JSON body is not an object", payload, topic)
    message_type = topic.split("/", 1)[0] if topic else None
    if "type" not in data and message_type:
        data["type"] = message_type
    elif message_type and data.get("type") != message_type:
        raise _wire_error(f"topic {message_type!r} does not match type {data.get('type')!r}", payload, topic)
    try:
        message = MESSAGE_ADAPTER.validate_python(data)
    except ValidationError as exc:
        error = _wire_error(_summarise(exc), payload, topic)
        if any(e["type"] == "string_too_long" and e["loc"][-1:] == ("prompt",) for e in exc.errors()):
            error.code = "prompt_too_long"
        raise error from exc
    return DecodedMessage(topic=topic or message.type, message=message, blobs=blobs, payload=payload)


def _may_be_too_deep(payload: bytes | bytearray) -> bool:
    """False when a small payload holds too few opening brackets (quoted ones too) to nest
    past the limit: the walk (15 us an event) is then skipped. Big payloads are walked
    anyway: counting their bytes would hold the GIL for ~10 ms per 40 MB scan, while the walk
    costs what the parsed structure holds (big strings are single nodes)."""
    if len(payload) > BRACKET_COUNT_BYTES:
        return True
    return payload.count(b"{") + payload.count(b"[") > MAX_JSON_DEPTH


def _too_deep(data: Any) -> bool:
    """True when objects and arrays nest more than ``MAX_JSON_DEPTH`` levels (no recursion)."""
    stack: list[tuple[Any, int]] = [(data, 1)] if isinstance(data, dict | list) else []
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _summarise(exc: ValidationError) -> str:
    """A short, human line per validation error, without echoing the (possibly huge) input."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "message"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
