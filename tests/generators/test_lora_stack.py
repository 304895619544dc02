"""The LoRA stack: strengths and order, and the rewired links in real exported graphs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from image_server.generators.workflow.graph import WorkflowFileError
from image_server.generators.workflow.lora_stack import (
    StackEntry,
    StackTooLong,
    find_sources,
    insert_loaders,
    plan_stack,
)
from image_server.generators.workflow.settings import StyleConfig, WorkflowSpec
from schemas import LoraSpec

FIXTURES = Path(__file__).parent.parent / "fixtures" / "workflows"


def graph_of(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def style(**fields) -> StyleConfig:
    return StyleConfig.model_validate(fields)


def strengths(stack: list[StackEntry]) -> list[tuple[str, float, str]]:
    return [(e.name, e.strength, e.role) for e in stack]


@pytest.mark.parametrize(
    ("characters", "each", "cinematic"),
    [(0, None, 1.0), (1, 0.85, 0.95), (2, 0.75, 0.85), (3, 0.65, 0.75), (5, 0.65, 0.75)],
)
def test_default_strengths_follow_the_number_of_characters(characters, each, cinematic):
    chars = [f"char{i}.safetensors" for i in range(characters)]
    stack = plan_stack(style(lora="look.safetensors", characters=chars, cinematic="cine.safetensors"), [])
    assert stack[0] == StackEntry("look.safetensors", 1.0, "style")
    assert [(e.name, e.strength) for e in stack[1:-1]] == [(c, each) for c in chars]
    assert stack[-1] == StackEntry("cine.safetensors", cinematic, "cinematic")


def test_request_loras_are_characters_after_the_styles_and_explicit_strength_wins():
    requested = [LoraSpec(name="alice.safetensors"), LoraSpec(name="bob.safetensors", strength=0.4)]
    configured = style(
        lora={"name": "noir.safetensors", "strength": 0.7}, characters=["carol.safetensors"], cinematic="c.st"
    )
    stack = plan_stack(configured, requested)
    assert strengths(stack) == [
        ("noir.safetensors", 0.7, "style"),  # configured strength wins over the style default 1.0
        ("carol.safetensors", 0.65, "character"),  # three characters in all
        ("alice.safetensors", 0.65, "character"),
        ("bob.safetensors", 0.4, "character"),  # explicit
        ("c.st", 0.75, "cinematic"),
    ]


def test_a_request_strength_of_exactly_one_is_explicit():
    (entry,) = plan_stack(None, [LoraSpec.model_validate({"name": "x.safetensors", "strength": 1.0})])
    assert entry.strength == 1.0
    (entry,) = plan_stack(None, [LoraSpec.model_validate({"name": "x.safetensors"})])
    assert entry.strength == 0.85


def test_more_than_ten_loras_is_refused():
    plan_stack(None, [LoraSpec(name=f"l{i}") for i in range(10)])
    with pytest.raises(StackTooLong, match="11 LoRAs"):
        plan_stack(style(cinematic="c"), [LoraSpec(name=f"l{i}") for i in range(10)])


def test_checkpoint_graph_gets_a_chain_between_the_loader_and_every_consumer():
    graph = graph_of("sd15_text_to_image.json")
    sources = find_sources(graph, WorkflowSpec(file="x"), source="sd15")
    assert sources is not None and sources.model == ("4", 0) and sources.clip == ("4", 1)
    stack = [StackEntry("a.safetensors", 0.8, "style"), StackEntry("b.safetensors", 0.6, "character")]
    new = insert_loaders(graph, stack, sources)
    assert new == ["10", "11"]
    first, second = graph["10"], graph["11"]
    assert first["class_type"] == second["class_type"] == "LoraLoader"
    assert first["inputs"] == {
        "model": ["4", 0],
        "clip": ["4", 1],
        "lora_name": "a.safetensors",
        "strength_model": 0.8,
        "strength_clip": 0.8,
    }
    assert second["inputs"]["model"] == ["10", 0] and second["inputs"]["clip"] == ["10", 1]
    assert graph["3"]["inputs"]["model"] == ["11", 0]  # KSampler
    assert graph["6"]["inputs"]["clip"] == ["11", 1] and graph["7"]["inputs"]["clip"] == ["11", 1]
    assert graph["8"]["inputs"]["vae"] == ["4", 2]  # the VAE output is not touched
    # Nothing but the chain still reads the loader's MODEL or CLIP.
    readers = {(n, k) for n, node in graph.items() for k, v in node["inputs"].items() if v in (["4", 0], ["4", 1])}
    assert readers == {("10", "model"), ("10", "clip")}


def test_flux_unet_and_dual_clip_graph():
    graph = graph_of("flux_dev_unet.json")
    sources = find_sources(graph, WorkflowSpec(file="x"), source="flux")
    assert sources is not None and sources.model == ("12", 0) and sources.clip == ("11", 0)
    new = insert_loaders(graph, [StackEntry("flux_style.safetensors", 1.0, "style")], sources)
    assert new == ["31"]
    assert graph["31"]["inputs"]["model"] == ["12", 0] and graph["31"]["inputs"]["clip"] == ["11", 0]
    assert graph["30"]["inputs"]["model"] == ["31", 0]  # ModelSamplingFlux, the only MODEL consumer
    assert graph["6"]["inputs"]["clip"] == ["31", 1]  # CLIPTextEncode
    assert graph["17"]["inputs"]["model"] == ["30", 0] and graph["22"]["inputs"]["model"] == ["30", 0]


def test_unet_without_a_text_encoder_loader_gets_model_only_loras():
    graph = graph_of("flux_dev_unet.json")
    del graph["11"]
    graph["6"]["inputs"]["clip"] = ["99", 0]  # an encoder the detector does not know
    sources = find_sources(graph, WorkflowSpec(file="x"), source="flux")
    assert sources is not None and sources.clip is None
    insert_loaders(graph, [StackEntry("m.safetensors", 0.5, "character")], sources)
    assert graph["31"] == {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": ["12", 0], "lora_name": "m.safetensors", "strength_model": 0.5},
        "_meta": {"title": "image_server character LoRA 1"},
    }


def test_two_model_loaders_need_an_explicit_source():
    graph = graph_of("sd15_text_to_image.json")
    graph["40"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "refiner.safetensors"}}
    with pytest.raises(WorkflowFileError, match=r"several MODEL loaders \(nodes 4, 40\); set lora_model_source"):
        find_sources(graph, WorkflowSpec(file="x"), source="two")
    spec = WorkflowSpec(file="x", lora_model_source="4.0", lora_clip_source="4.1")
    sources = find_sources(graph, spec, source="two")
    assert sources is not None and sources.model == ("4", 0)
