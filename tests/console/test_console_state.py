"""ConsoleState: events folded into cards, rows and error rates."""

from __future__ import annotations

from pathlib import Path

from image_server.console.state import ConsoleState
from schemas import ImageReady, OutputImage, RenderAccepted, RenderError, RenderProgress


def _ready(request_id: str, output: Path, generator: str = "mock") -> ImageReady:
    path = output / "p" / generator / "20260101" / f"{request_id}_0.png"
    image = OutputImage(path=str(path), width=64, height=48, format="png", seed=7)
    return ImageReady(request_id=request_id, generator=generator, images=[image], prompt="a fox")


def test_a_request_moves_from_running_to_a_card(tmp_path):
    state = ConsoleState(tmp_path)
    state.note_sent("r1", "a fox")
    state.apply(RenderAccepted(request_id="r1", generator="mock", queue_position=2))
    assert state.running["r1"].mine and state.running["r1"].queue_position == 2
    state.apply(RenderProgress(request_id="r1", stage="generating", progress=0.5))
    assert state.running["r1"].stage == "generating" and state.running["r1"].progress == 0.5
    updates = state.apply(_ready("r1", tmp_path))
    assert [name for name, _ in updates] == ["done", "card", "generators"]
    assert "r1" not in state.running
    card = state.cards[0]
    assert (card.ok, card.image, card.width, card.seed) == (True, "p/mock/20260101/r1_0.png", 64, 7)


def test_a_republished_terminal_event_makes_no_second_card(tmp_path):
    state = ConsoleState(tmp_path)
    state.apply(_ready("r1", tmp_path))
    assert state.apply(_ready("r1", tmp_path)) == [("done", "r1")]
    assert len(state.cards) == 1


def test_error_rate_counts_only_the_generators_failures(tmp_path):
    state = ConsoleState(tmp_path)
    state.apply(_ready("ok", tmp_path))
    state.apply(RenderError(request_id="f", code="generation_failed", message="boom", generator="mock"))
    state.apply(RenderError(request_id="c", code="cancelled", message="by request", generator="mock"))
    state.apply(RenderError(request_id="p", code="content_policy", message="refused", generator="mock"))
    assert state.error_rate("mock") == 0.5
    assert state.error_rate("never-used") is None


def test_images_outside_the_output_dir_get_no_archive_path(tmp_path):
    state = ConsoleState(tmp_path / "output")
    state.apply(_ready("r1", tmp_path / "elsewhere"))
    assert state.cards[0].image is None
