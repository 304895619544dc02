"""A workflow file checked against its mapping: every target exists, placeholders are known.

Compiling happens when the config is validated (start-up), so a mapping that names a node or
input the file lacks is a config error naming file, node and input, not a failed request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from image_server.generators.workflow.graph import (
    Graph,
    InputRef,
    WorkflowFileError,
    check_target,
    find_placeholders,
    read_graph_text,
)
from image_server.generators.workflow.lora_stack import LoraSources, check_stack_node, find_sources
from image_server.generators.workflow.settings import (
    ALL_FIELDS,
    MAX_REFERENCES,
    REFERENCE_FIELDS,
    SCALAR_FIELDS,
    WorkflowSpec,
)

OUTPUT_CLASSES = frozenset({"SaveImage", "PreviewImage"})


@dataclass(frozen=True)
class CompiledWorkflow:
    name: str
    path: Path
    spec: WorkflowSpec
    targets: dict[str, list[InputRef]]  # scalar field -> inputs it sets
    references: list[list[InputRef]]  # slot i -> inputs taking reference image i+1
    depth_map: list[InputRef]
    placeholders: dict[str, list[InputRef]] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    lora_sources: LoraSources | None = None
    text: str = "{}"  # the file as read at start-up; each request parses its own copy

    @property
    def takes_loras(self) -> bool:
        return self.lora_sources is not None or self.spec.lora_stack_node is not None

    def graph(self) -> Graph:
        """A fresh copy of the exported graph."""
        graph: Graph = json.loads(self.text)
        return graph

    def takes(self, name: str) -> bool:
        return bool(self.targets.get(name) or self.placeholders.get(name))


def compile_workflow(directory: Path, name: str, spec: WorkflowSpec) -> CompiledWorkflow:
    path = directory / spec.file
    source = str(path)
    file_text = read_graph_text(path)
    graph: Graph = json.loads(file_text)
    targets: dict[str, list[InputRef]] = {}
    for key, value in spec.inputs.items():
        texts = [value] if isinstance(value, str) else value
        refs = []
        for text in texts:
            try:
                ref = InputRef.parse(text)
            except WorkflowFileError as exc:
                raise WorkflowFileError(f"{source}: inputs.{key}: {exc}") from None
            check_target(graph, ref, source=source, what=f"inputs.{key} = {text!r}")
            refs.append(ref)
        targets[key] = refs
    references: list[list[InputRef]] = [[ref] for ref in targets.pop("reference_images", [])]
    placeholders = find_placeholders(graph)
    unknown = sorted(set(placeholders) - ALL_FIELDS)
    if unknown:
        where = placeholders[unknown[0]][0]
        raise WorkflowFileError(
            f"{source}: node {where.node} input {where.input!r} has an unknown placeholder {{{{{unknown[0]}}}}}; "
            f"known: {', '.join(sorted(ALL_FIELDS))}"
        )
    for index, field_name in enumerate(REFERENCE_FIELDS):
        extra = targets.pop(field_name, []) + placeholders.pop(field_name, [])
        if not extra:
            continue
        while len(references) <= index:
            references.append([])
        references[index].extend(extra)
    if any(not slot for slot in references):
        gap = next(i for i, slot in enumerate(references) if not slot) + 1
        raise WorkflowFileError(f"{source}: reference image {gap} has no input, but a later one does")
    if len(references) > MAX_REFERENCES:
        raise WorkflowFileError(f"{source}: at most {MAX_REFERENCES} reference images")
    depth = targets.pop("depth_map", []) + placeholders.pop("depth_map", [])
    placeholders.pop("reference_images", None)
    outputs = tuple(spec.outputs) or tuple(i for i, node in graph.items() if node["class_type"] in OUTPUT_CLASSES)
    for node_id in spec.outputs:
        if node_id not in graph:
            raise WorkflowFileError(f"{source}: outputs names node {node_id}, which the workflow does not have")
    if not outputs:
        raise WorkflowFileError(f"{source}: no output node; name one in outputs or add a SaveImage node")
    for key in spec.defaults:
        if key not in SCALAR_FIELDS:
            raise WorkflowFileError(f"{source}: defaults.{key} is not one of {', '.join(SCALAR_FIELDS)}")
    if spec.lora_stack_node is not None:
        check_stack_node(graph, spec.lora_stack_node, source=source)
        sources = None
    else:
        sources = find_sources(graph, spec, source=source)
    return CompiledWorkflow(name, path, spec, targets, references, depth, placeholders, outputs, sources, file_text)
