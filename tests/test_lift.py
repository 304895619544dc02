"""schemas.lift.loads gives exactly json.loads's result, lifting big base64 strings."""

from __future__ import annotations

import base64
import json
import os

import pytest

from schemas import lift


def big(n: int = 300_000) -> str:
    return base64.b64encode(os.urandom(n)).decode()


@pytest.mark.parametrize(
    "document",
    [
        {
            "request_id": "a",
            "prompt": "p",
            "reference_images": [{"image_data": big()}, {"uri": "data:image/png;base64," + big()}],
        },
        {
            "request_id": "a",
            "prompt": 'mentions "image_data": "x" and \\"uri\\"',
            "reference_image": {"image_data": big()},
        },
        {"request_id": "a", "prompt": "p", "metadata": {"image_data": big(), "nested": [{"uri": big()}]}},
        {
            "request_id": "a",
            "prompt": "p",
            "reference_image": {"image_data": big(10)},
            "metadata": {"pad": "x" * 400_000},
        },
    ],
)
def test_same_result_as_json_loads(document):
    payload = json.dumps(document).encode()
    assert lift.loads(payload) == json.loads(payload)


def test_escaped_strings_are_left_to_the_parser():
    value = big().replace("/", "\\/")  # some encoders escape '/'; the parser must unescape it
    payload = ('{"request_id": "a", "reference_image": {"image_data": "' + value + '"}}').encode()
    assert lift.loads(payload) == json.loads(payload)
    small, lifted = lift._lift(payload)
    assert not lifted and small == payload


def test_big_strings_are_really_lifted():
    payload = json.dumps({"reference_images": [{"image_data": big()} for _ in range(3)]}).encode()
    small, lifted = lift._lift(payload)
    assert len(lifted) == 3 and len(small) < 1000


def test_invalid_json_still_raises():
    payload = b'{"image_data": "' + big().encode() + b'", }'
    with pytest.raises(ValueError):
        lift.loads(payload)


@pytest.mark.parametrize("shift", range(-8, 3))
def test_a_key_straddling_a_search_window_edge_is_still_lifted(shift):
    # The keys are searched for a window at a time; one cut by a window's end must be found.
    head = '{"request_id": "a", "metadata": {"pad": "'
    middle = '"}, "reference_image": {"uri": "data:image/png;base64,'
    pad = "x" * (lift._WINDOW_BYTES + shift - len(head) - len('"}, "reference_image": {'))
    payload = (head + pad + middle + big() + '"}}').encode()
    key_at = payload.index(b'"uri"')
    assert lift._WINDOW_BYTES - 8 <= key_at <= lift._WINDOW_BYTES + 2
    small, lifted = lift._lift(payload)
    assert len(lifted) == 1 and len(small) < len(payload) - 300_000
    assert lift.loads(payload) == json.loads(payload)


def test_values_after_megabytes_of_other_json_are_lifted_in_order():
    images = [big(), big(70_000)]
    document = {
        "metadata": {"notes": ["n" * 1000] * 3000},  # 3 MB with no key: several empty windows
        "reference_images": [{"image_data": images[0]}, {"uri": images[1]}],
    }
    payload = json.dumps(document).encode()
    small, lifted = lift._lift(payload)
    assert [payload[a:b].decode() for a, b in lifted.values()] == images
    assert lift.loads(payload) == document
