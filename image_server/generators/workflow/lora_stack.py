"""The LoRA stack: which LoRAs, in what order and at what strength, and wiring them into a graph.

Order is the style LoRA, then character LoRAs (the style's, then the request's), then the
cinematic LoRA. Strengths a request or config leaves out follow the tables below, which keep
the sum of character weights near what one LoRA at full strength would give. The graph side
inserts a chain of ``LoraLoader`` nodes right after the model (and text-encoder) loader and
moves every consumer of those outputs onto the end of the chain; or, when the workflow has a
stack node, fills its slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from image_server.generators.workflow.graph import Graph, WorkflowFileError, is_link, next_node_id
from image_server.generators.workflow.settings import LoraChoice, LoraStackNode, StyleConfig, WorkflowSpec
from schemas import LoraSpec

MAX_LORAS = 10
Role = Literal["style", "character", "cinematic"]

# Loader class -> (MODEL output index, CLIP output index); None where the loader has no such output.
LOADER_OUTPUTS: dict[str, tuple[int | None, int | None]] = {
    "CheckpointLoaderSimple": (0, 1),
    "CheckpointLoader": (0, 1),
    "unCLIPCheckpointLoader": (0, 1),
    "ImageOnlyCheckpointLoader": (0, None),
    "UNETLoader": (0, None),
    "UnetLoaderGGUF": (0, None),
    "CLIPLoader": (None, 0),
    "DualCLIPLoader": (None, 0),
    "TripleCLIPLoader": (None, 0),
    "QuadrupleCLIPLoader": (None, 0),
    "CLIPLoaderGGUF": (None, 0),
    "DualCLIPLoaderGGUF": (None, 0),
}


class StackTooLong(ValueError):
    pass


@dataclass(frozen=True)
class StackEntry:
    name: str
    strength: float
    role: Role

    def as_applied(self) -> dict[str, object]:
        return {"name": self.name, "strength": self.strength, "role": self.role}


def character_strength(count: int) -> float:
    return {1: 0.85, 2: 0.75}.get(count, 0.65)


def cinematic_strength(characters: int) -> float:
    return {0: 1.0, 1: 0.95, 2: 0.85}.get(characters, 0.75)


def plan_stack(style: StyleConfig | None, requested: Sequence[LoraSpec]) -> list[StackEntry]:
    """The final stack for a style and a request's ``loras`` (which count as characters)."""
    characters: list[tuple[str, float | None]] = [(c.name, c.strength) for c in (style.characters if style else [])]
    for spec in requested:
        explicit = "strength" in spec.model_fields_set
        characters.append((spec.name, spec.strength if explicit else None))
    stack: list[StackEntry] = []
    if style is not None and style.lora is not None:
        stack.append(StackEntry(style.lora.name, _or(style.lora, 1.0), "style"))
    default = character_strength(len(characters))
    stack += [StackEntry(name, default if s is None else s, "character") for name, s in characters]
    if style is not None and style.cinematic is not None:
        stack.append(
            StackEntry(style.cinematic.name, _or(style.cinematic, cinematic_strength(len(characters))), "cinematic")
        )
    if len(stack) > MAX_LORAS:
        raise StackTooLong(f"{len(stack)} LoRAs in the stack (style, characters, cinematic); at most {MAX_LORAS}")
    return stack


def _or(choice: LoraChoice, default: float) -> float:
    return default if choice.strength is None else choice.strength


@dataclass(frozen=True)
class LoraSources:
    """Where the stack attaches: the (node, output) links carrying MODEL and CLIP."""

    model: tuple[str, int]
    clip: tuple[str, int] | None


def find_sources(graph: Graph, spec: WorkflowSpec, *, source: str) -> LoraSources | None:
    """The configured or detected loader outputs; None if the graph has no model loader."""
    model = _configured(graph, spec.lora_model_source, source=source, what="lora_model_source")
    clip = _configured(graph, spec.lora_clip_source, source=source, what="lora_clip_source")
    if model is None:
        model = _detect(graph, 0, source=source, kind="MODEL")
    if clip is None:
        clip = _detect(graph, 1, source=source, kind="CLIP")
    return LoraSources(model, clip) if model is not None else None


def _configured(graph: Graph, text: str | None, *, source: str, what: str) -> tuple[str, int] | None:
    if text is None:
        return None
    node, _, index = text.rpartition(".")
    if node not in graph:
        raise WorkflowFileError(f"{source}: {what} names node {node}, which the workflow does not have")
    return node, int(index)


def _detect(graph: Graph, which: int, *, source: str, kind: str) -> tuple[str, int] | None:
    found = [
        (node_id, outputs[which])
        for node_id, node in graph.items()
        if (outputs := LOADER_OUTPUTS.get(node["class_type"])) and outputs[which] is not None
    ]
    if len(found) > 1:
        names = ", ".join(node_id for node_id, _ in found)
        option = "lora_model_source" if kind == "MODEL" else "lora_clip_source"
        raise WorkflowFileError(f"{source}: several {kind} loaders (nodes {names}); set {option} = '<node>.<output>'")
    return (found[0][0], int(found[0][1])) if found else None  # type: ignore[arg-type]


def check_stack_node(graph: Graph, stack: LoraStackNode, *, source: str) -> None:
    node = graph.get(stack.node)
    if node is None:
        raise WorkflowFileError(f"{source}: lora_stack_node names node {stack.node}, which the workflow does not have")
    wanted = [stack.name_input, stack.strength_input, stack.clip_strength_input]
    for template in filter(None, wanted):
        name = template.format(i=1)
        if name not in node.get("inputs", {}):
            raise WorkflowFileError(
                f"{source}: lora_stack_node: node {stack.node} ({node['class_type']}) has no input {name!r}"
            )


def insert_loaders(graph: Graph, stack: Sequence[StackEntry], sources: LoraSources) -> list[str]:
    """Chain ``LoraLoader`` nodes after the loaders and rewire every consumer; returns the new ids."""
    if not stack:
        return []
    model_link, clip_link = list(sources.model), list(sources.clip) if sources.clip else None
    consumers = [
        (node, key, value)
        for node in graph.values()
        for key, value in node.get("inputs", {}).items()
        if is_link(value) and (value == model_link or value == clip_link)
    ]
    first = next_node_id(graph)
    new_ids: list[str] = []
    previous_model, previous_clip = model_link, clip_link
    for offset, entry in enumerate(stack):
        node_id = str(first + offset)
        inputs: dict[str, object] = {"model": previous_model, "lora_name": entry.name, "strength_model": entry.strength}
        if previous_clip is not None:
            inputs |= {"clip": previous_clip, "strength_clip": entry.strength}
        graph[node_id] = {
            "class_type": "LoraLoader" if previous_clip is not None else "LoraLoaderModelOnly",
            "inputs": inputs,
            "_meta": {"title": f"image_server {entry.role} LoRA {offset + 1}"},
        }
        previous_model = [node_id, 0]
        previous_clip = [node_id, 1] if previous_clip is not None else None
        new_ids.append(node_id)
    for node, key, value in consumers:
        node["inputs"][key] = previous_model if value == model_link else previous_clip
    return new_ids


def fill_stack_node(graph: Graph, stack: Sequence[StackEntry], config: LoraStackNode) -> None:
    if len(stack) > config.slots:
        raise StackTooLong(f"{len(stack)} LoRAs, but stack node {config.node} has {config.slots} slots")
    inputs = graph[config.node]["inputs"]
    for slot in range(1, config.slots + 1):
        entry = stack[slot - 1] if slot <= len(stack) else None
        name_key = config.name_input.format(i=slot)
        if name_key not in inputs and entry is None:
            continue
        inputs[name_key] = entry.name if entry else config.empty
        inputs[config.strength_input.format(i=slot)] = entry.strength if entry else 0.0
        if config.clip_strength_input:
            inputs[config.clip_strength_input.format(i=slot)] = entry.strength if entry else 0.0
    if config.count_input:
        inputs[config.count_input] = len(stack)
