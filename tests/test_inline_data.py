"""Base64 decoded in chunks (inline_data) and big frames copied out of libzmq in chunks (offload):
the same bytes as one-shot decoding and copying, the same refusals."""

from __future__ import annotations

import base64
import os
import sys
import threading

import pytest
import zmq

from image_server.errors import ReferenceImageError
from image_server.inline_data import CHUNK_CHARS, decode_base64_head, decode_base64_source
from image_server.offload import COPY_CHUNK_BYTES, as_bytes_in_chunks, uninitialized_bytearray

# Lengths around the chunk boundary (CHUNK_CHARS base64 characters = 3/4 as many bytes).
EDGE = CHUNK_CHARS // 4 * 3
SIZES = [1, 2, 3, 57, EDGE - 1, EDGE, EDGE + 1, 2 * EDGE + 2, 1_500_001]
LIMIT = 10 * 1024 * 1024


def wrapped(text: str, width: int = 76, newline: str = "\n") -> str:
    return newline.join(text[i : i + width] for i in range(0, len(text), width))


@pytest.mark.parametrize("size", SIZES)
def test_chunked_decode_gives_the_same_bytes_in_every_spelling(size):
    raw = os.urandom(size)
    text = base64.b64encode(raw).decode()
    spellings = [
        text,
        text.rstrip("="),  # padding left off
        wrapped(text),  # MIME line breaks, so the chunks must be re-aligned
        wrapped(text, 64, "\r\n"),
        " " + wrapped(text, 1000, " \t") + "\n",
        "data:image/png;base64," + wrapped(text),
        "DATA:image/jpeg;charset=x;BASE64," + text,
    ]
    for spelling in spellings:
        assert decode_base64_source(spelling, LIMIT) == raw


def test_a_bad_character_past_the_first_chunk_is_found():
    text = base64.b64encode(os.urandom(3 * EDGE)).decode()
    broken = text[: 2 * CHUNK_CHARS + 10] + "*" + text[2 * CHUNK_CHARS + 11 :]
    with pytest.raises(ReferenceImageError, match="not valid base64"):
        decode_base64_source(broken, LIMIT)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("\n\n", "empty"),
        ("data:image/png;base64", "malformed data URI"),
        ("data:image/png,aGVsbG8=", "only base64"),
        ("aGVsbG8=x", "not valid base64"),
    ],
)
def test_malformed_input_is_refused_with_a_reason(text, message):
    with pytest.raises(ReferenceImageError, match=message):
        decode_base64_source(text, LIMIT)


@pytest.mark.parametrize("size", [100, EDGE + 7])
def test_one_byte_over_the_limit_is_refused_by_the_full_and_the_head_decode(size):
    text = wrapped(base64.b64encode(os.urandom(size)).decode())
    assert len(decode_base64_source(text, size)) == size
    with pytest.raises(ReferenceImageError, match=f"larger than the limit of {size - 1} bytes"):
        decode_base64_source(text, size - 1)
    with pytest.raises(ReferenceImageError, match=f"larger than the limit of {size - 1} bytes"):
        decode_base64_head(text, size - 1, 16)


def test_a_payload_far_over_the_limit_is_refused_before_any_decoding():
    # Not valid base64 at all: refused for its length, so nothing was decoded.
    with pytest.raises(ReferenceImageError, match="larger than the limit of 1000 bytes"):
        decode_base64_source("*" * 100_000, 1000)


@pytest.mark.parametrize("size", [10, EDGE - 1, EDGE + 1, 3 * EDGE])
def test_the_head_is_the_start_of_the_data_and_says_whether_it_is_all(size):
    raw = os.urandom(size)
    head, complete = decode_base64_head(wrapped(base64.b64encode(raw).decode()), LIMIT, 1024)
    assert raw.startswith(head) and len(head) >= min(size, 1024)
    assert complete == (head == raw)
    assert len(head) <= EDGE + 3  # one chunk, not all of it


def test_the_head_does_not_look_at_characters_past_it():
    text = base64.b64encode(os.urandom(3 * EDGE)).decode()
    broken = text[:-100] + "*" + text[-99:]
    head, complete = decode_base64_head(broken, LIMIT, 1024)
    assert not complete and base64.b64decode(text).startswith(head)
    with pytest.raises(ReferenceImageError, match="not valid base64"):
        decode_base64_source(broken, LIMIT)  # the full decode, when the request runs, finds it


def test_uninitialized_bytearray_is_writable_and_of_the_size_asked():
    buffer = uninitialized_bytearray(3 * COPY_CHUNK_BYTES + 5)
    assert isinstance(buffer, bytearray) and len(buffer) == 3 * COPY_CHUNK_BYTES + 5
    assert sys.getrefcount(buffer) == 2  # ours and the call's: the C API's new reference is not leaked
    buffer[-5:] = b"abcde"
    assert bytes(buffer[-5:]) == b"abcde"


def test_big_frames_received_zero_copy_are_copied_out_intact():
    context = zmq.Context()
    try:
        pull = context.socket(zmq.PULL)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push = context.socket(zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{port}")
        frames = [b"topic", os.urandom(100), os.urandom(COPY_CHUNK_BYTES), os.urandom(5 * COPY_CHUNK_BYTES + 3)]
        push.send_multipart(frames)
        assert pull.poll(5000)
        received = pull.recv_multipart(copy=False)
        assert as_bytes_in_chunks(received) == frames
    finally:
        context.destroy(linger=0)


def test_gil_bound_work_runs_there_from_a_worker_and_at_once_from_itself():
    from concurrent.futures import ThreadPoolExecutor

    from image_server.offload import in_gil_bound_thread

    def where() -> str:
        return threading.current_thread().name

    with ThreadPoolExecutor(1) as worker:
        assert worker.submit(in_gil_bound_thread, where).result(timeout=5).startswith("gil-bound")
        nested = worker.submit(in_gil_bound_thread, in_gil_bound_thread, where)
        assert nested.result(timeout=5).startswith("gil-bound")  # no deadlock waiting for itself
