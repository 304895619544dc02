"""InvokeAI response parsing: JSON that parses but is not what InvokeAI sends is a clear error."""

from __future__ import annotations

from typing import Any

import pytest

from image_server.generators.invokeai.wire import (
    Malformed,
    QueueItem,
    detail_of,
    failure_text,
    parse_boards,
    parse_enqueue,
    parse_models,
    parse_queue_item,
)

SESSION = {
    "results": {
        "p-resize": {"type": "image_output", "image": {"image_name": "resized.png"}, "width": 8, "height": 8},
        "p-out": {"type": "image_output", "image": {"image_name": "out.png"}, "width": 512, "height": 768},
    },
    "source_prepared_mapping": {"init_resize": ["p-resize"], "output": ["p-out"]},
}


def test_only_the_output_nodes_images_are_ours() -> None:
    item = parse_queue_item({"item_id": 3, "status": "completed", "session": SESSION}, generator="g")
    assert [(i.image_name, i.width, i.height) for i in item.images] == [("out.png", 512, 768)]
    # Without source_prepared_mapping, the reverse mapping is used.
    session = {"results": SESSION["results"], "prepared_source_mapping": {"p-resize": "init_resize", "p-out": "output"}}
    item = parse_queue_item({"item_id": 3, "status": "completed", "session": session}, generator="g")
    assert [i.image_name for i in item.images] == ["out.png"]


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ({"item_id": "3", "status": "completed"}, "item_id '3'"),
        ({"item_id": 3, "status": "exploded"}, "status 'exploded'"),
        ({"item_id": 3, "status": "completed", "session": {"results": {}}}, "without an image from the output node"),
        ([1, 2], "item_id None"),
    ],
)
def test_queue_items_invokeai_never_sends(payload: Any, words: str) -> None:
    with pytest.raises(Malformed, match=words):
        parse_queue_item(payload, generator="g")


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ({"item_ids": [1]}, "without batch.batch_id"),
        ({"batch": {"batch_id": "b"}, "item_ids": ["1"]}, "not integers"),
        ({"batch": {"batch_id": "b"}, "item_ids": [True]}, "not integers"),
    ],
)
def test_enqueue_results_invokeai_never_sends(payload: Any, words: str) -> None:
    with pytest.raises(Malformed, match=words):
        parse_enqueue(payload, generator="g")


def test_enqueue_results_with_and_without_item_ids() -> None:
    assert parse_enqueue({"batch": {"batch_id": "b"}, "item_ids": [4, 5]}, generator="g") == ("b", [4, 5])
    assert parse_enqueue({"batch": {"batch_id": "b"}}, generator="g") == ("b", None)  # before 6.0


def test_model_records_need_key_name_base_and_type() -> None:
    record = {"key": "k", "name": "n", "base": "sdxl", "type": "main", "default_settings": {"steps": 9}}
    (model,) = parse_models({"models": [record]}, generator="g")
    assert (model.key, model.hash, model.defaults) == ("k", "", {"steps": 9})
    with pytest.raises(Malformed, match="without key, name, base and type"):
        parse_models({"models": [{"key": "k", "name": "n"}]}, generator="g")


def test_boards_from_a_list_or_a_page() -> None:
    boards = [{"board_id": "1", "board_name": "a"}, {"board_id": "2", "board_name": "a"}, {"board_id": 3}]
    assert parse_boards(boards, generator="g") == {"a": "1"}
    assert parse_boards({"items": boards}, generator="g") == {"a": "1"}


def test_error_details_and_failures_read_as_one_line() -> None:
    detail = {"detail": [{"loc": ["body", "batch", "graph"], "msg": "Field required", "type": "missing"}]}
    assert detail_of(detail) == "batch.graph: Field required"
    assert detail_of({"detail": "Not Found"}) == "Not Found"
    long = QueueItem(1, "failed", "RuntimeError", "x" * 1000)
    assert failure_text(long).startswith("RuntimeError: xxx") and len(failure_text(long)) == 500
    assert failure_text(QueueItem(1, "failed")) == "error: no message"
