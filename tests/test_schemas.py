"""schemas: bounds, the discriminated union, frame encodings, pydantic-only imports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from schemas import (
    CancelRequest,
    Heartbeat,
    ImageReady,
    ImageSource,
    OutputImage,
    RenderAccepted,
    RenderError,
    RenderProgress,
    RenderRequest,
    ServiceStatus,
    StatusRequest,
    WireError,
    decode_frames,
    encode_message,
    sniff_request_id,
)
from schemas.wire import BRACKET_COUNT_BYTES, MAX_JSON_DEPTH


def test_importing_schemas_pulls_in_neither_zmq_nor_pil():
    code = "import sys, schemas; print(sorted(m for m in sys.modules if m.split('.')[0] in ('zmq', 'PIL', 'image_server', 'httpx')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "fields",
    [
        {"request_id": "", "prompt": "p"},
        {"request_id": "has space", "prompt": "p"},
        {"request_id": "x" * 129, "prompt": "p"},
        {"request_id": "ok", "prompt": ""},
        {"request_id": "ok", "prompt": "x" * 10_001},
        {"request_id": "ok", "prompt": "p", "width": 63},
        {"request_id": "ok", "prompt": "p", "height": 4097},
        {"request_id": "ok", "prompt": "p", "reference_images": [{"uri": "data:,"}] * 11},
        {
            "request_id": "ok",
            "prompt": "p",
            "reference_image": {"uri": "data:,"},
            "reference_images": [{"uri": "data:,"}] * 10,
        },
        {"request_id": "ok", "prompt": "p", "project": "../etc"},
        {"request_id": "ok", "prompt": "p", "generator": "a/b"},
        {"request_id": "ok", "prompt": "p", "output_format": "gif"},
    ],
)
def test_request_bounds(fields):
    with pytest.raises(ValidationError):
        RenderRequest(**fields)


def test_image_source_needs_exactly_one():
    with pytest.raises(ValidationError, match="exactly one"):
        ImageSource()
    with pytest.raises(ValidationError, match="exactly one"):
        ImageSource(uri="data:,", image_data="abc")
    assert ImageSource(image_data="abc").image_data == "abc"


def test_inbound_messages_ignore_unknown_fields():
    decoded = decode_frames(
        [b"RenderRequest", json.dumps({"request_id": "a", "prompt": "p", "era": "future"}).encode()]
    )
    assert decoded.message.request_id == "a" and not hasattr(decoded.message, "era")


def test_every_message_round_trips_through_frames():
    image = OutputImage(uri="file:///x.png", width=1, height=1, format="png")
    messages = [
        RenderRequest(request_id="r", prompt="p", reference_images=[ImageSource(uri="data:,")]),
        CancelRequest(request_id="r"),
        StatusRequest(request_id="s"),
        RenderAccepted(request_id="r", generator="mock", seq=3, service_id="svc"),
        RenderProgress(request_id="r", stage="generating", progress=0.5),
        ImageReady(request_id="r", generator="mock", images=[image], uri=image.uri),
        RenderError(request_id="r", code="timeout", message="slow", retryable=True),
        Heartbeat(uptime_s=1.5),
        ServiceStatus(default_generator="mock"),
    ]
    for message in messages:
        frames = encode_message(message, reply_to="me", blobs=[b"\x00raw"])
        assert frames[0] == f"{message.type}/me".encode()
        decoded = decode_frames(frames)
        assert decoded.message == message and list(decoded.blobs) == [b"\x00raw"]


def test_single_frame_forms():
    body = {"request_id": "a", "prompt": "p"}
    assert decode_frames([b"RenderRequest " + json.dumps(body).encode()]).message.request_id == "a"
    assert decode_frames([json.dumps({"type": "RenderRequest", **body}).encode()]).message.request_id == "a"


@pytest.mark.parametrize(
    ("frames", "request_id"),
    [
        ([b"RenderRequest", b'{"request_id": "abc", "prompt": '], "abc"),
        ([b"RenderRequest", b'{"request_id": "abc", "prompt": ""}'], "abc"),
        ([b"RenderRequest", b'{"request_id": "bad id", "prompt": ""}'], None),
        ([b"\xff", b'{"request_id": "abc"}'], "abc"),
        ([b"nonsense"], None),
        ([], None),
        ([b"RenderRequest", b"[]"], None),
    ],
)
def test_decode_errors_carry_readable_request_ids(frames, request_id):
    with pytest.raises(WireError) as info:
        decode_frames(frames)
    assert info.value.request_id == request_id


def test_sniff_request_id_from_truncated_text():
    assert sniff_request_id(b'{"prompt": "x", "request_id": "r-1"') == "r-1"
    assert sniff_request_id(b"garbage") is None


def _nested_metadata(levels: int, innermost: bytes = b"1") -> bytes:
    """A RenderRequest whose metadata nests ``levels`` objects (the request itself is one more)."""
    value = innermost
    for _ in range(levels):
        value = b'{"k": ' + value + b"}"
    return b'{"type": "RenderRequest", "request_id": "n", "prompt": "p", "metadata": ' + value + b"}"


def test_json_nesting_is_refused_past_the_limit_however_few_brackets_it_takes():
    assert decode_frames([_nested_metadata(MAX_JSON_DEPTH - 1)]).message.request_id == "n"
    with pytest.raises(WireError, match="nested deeper") as refused:
        decode_frames([_nested_metadata(MAX_JSON_DEPTH)])
    assert refused.value.request_id == "n"
    # A big message (its brackets are not counted) is walked, and refused the same way.
    big = b'"' + b"x" * (BRACKET_COUNT_BYTES + 1) + b'"'
    with pytest.raises(WireError, match="nested deeper"):
        decode_frames([_nested_metadata(MAX_JSON_DEPTH, big)])


def test_brackets_inside_strings_do_not_make_a_message_too_deep():
    prompt = "{[" * 200  # 400 brackets, all quoted: the message is two levels deep
    body = json.dumps({"type": "RenderRequest", "request_id": "b", "prompt": prompt}).encode()
    assert decode_frames([body]).message.prompt == prompt
