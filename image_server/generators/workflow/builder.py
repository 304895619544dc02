"""From a request to the graph a server runs: mapping, placeholders, style, LoRA stack.

Both workflow strategies use this: comfyui posts the graph to ``/prompt``, runpod sends it as
worker-comfyui's ``input.workflow``. Blocking only in the sense of CPU work on a small dict.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from image_server.errors import InvalidRequest, Unsupported
from image_server.generators.base import Capabilities
from image_server.generators.workflow.compiled import CompiledWorkflow
from image_server.generators.workflow.config import WorkflowGeneratorConfig
from image_server.generators.workflow.graph import PLACEHOLDER, Graph, fill_placeholder, set_input
from image_server.generators.workflow.lora_stack import StackTooLong, fill_stack_node, insert_loaders, plan_stack
from image_server.generators.workflow.settings import SCALAR_FIELDS, StyleConfig
from schemas import RenderRequest

# Where a placeholder with no value from the request or config falls back to something sane.
PLACEHOLDER_FALLBACKS: dict[str, Any] = {"negative_prompt": "", "width": 1024, "height": 1024}
SEED_LIMIT = 2**32  # a random seed small enough for every sampler node


@dataclass
class BuiltGraph:
    graph: Graph
    prompt: str
    seed: int | None
    applied: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def workflow_capabilities(config: WorkflowGeneratorConfig) -> Capabilities:
    """What the default workflow can take, from what its mapping and placeholders name."""
    workflow = config.compiled()
    parameters = {
        name
        for name, field_name in (
            ("seed", "seed"),
            ("negative_prompt", "negative_prompt"),
            ("steps", "steps"),
            ("guidance_scale", "cfg"),
            ("strength", "denoise"),
        )
        if workflow.takes(field_name)
    }
    if config.styles:
        parameters.add("style")
    return Capabilities(
        image_to_image=bool(workflow.references),
        max_reference_images=len(workflow.references),
        depth_map=bool(workflow.depth_map),
        loras=workflow.takes_loras,
        parameters=frozenset(parameters),
    )


def build_graph(
    config: WorkflowGeneratorConfig,
    request: RenderRequest,
    *,
    reference_values: Sequence[str] = (),
    depth_value: str | None = None,
) -> BuiltGraph:
    """The graph to run for ``request``; ``reference_values`` are what each LoadImage gets."""
    workflow = config.compiled()
    style = _style(config, request)
    prefix, suffix = (style.prompt_prefix, style.prompt_suffix) if style else ("", "")
    prompt = f"{prefix}{request.prompt}{suffix}"
    values: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": request.negative_prompt
        if request.negative_prompt is not None
        else _of(style, "negative_prompt"),
        "width": request.width or _of(style, "width"),
        "height": request.height or _of(style, "height"),
        "steps": request.steps or _of(style, "steps"),
        "cfg": request.guidance_scale,
        "denoise": request.strength,
        "seed": request.seed,
    }
    for name, default in workflow.spec.defaults.items():
        if values.get(name) is None:
            values[name] = default
    if values["seed"] is None and workflow.takes("seed"):
        values["seed"] = random.randrange(SEED_LIMIT)
    graph = workflow.graph()
    applied: dict[str, Any] = {"workflow": workflow.name}
    for name in SCALAR_FIELDS:
        value = values.get(name)
        for ref in workflow.targets.get(name, []):
            if value is not None:
                set_input(graph, ref, value)
        for ref in workflow.placeholders.get(name, []):
            if value is None:
                value = PLACEHOLDER_FALLBACKS.get(name)
            if value is None:
                raise InvalidRequest(
                    f"workflow {workflow.name!r} has a {{{{{name}}}}} placeholder and the request gives no {name}; "
                    f"set defaults.{name} in its config"
                )
            fill_placeholder(graph, ref, name, value)
        if value is not None and workflow.takes(name) and name not in ("prompt", "negative_prompt"):
            applied[name] = value
    _place_images(graph, workflow, reference_values, depth_value)
    stack = _stack(graph, workflow, style, request)
    if stack:
        applied["loras"] = stack
    if style is not None:
        applied["style"] = request.style
    ignored = [name for name in ("width", "height") if getattr(request, name) is not None and not workflow.takes(name)]
    return BuiltGraph(graph, prompt, values["seed"] if workflow.takes("seed") else None, applied, ignored)


def _of(style: StyleConfig | None, name: str) -> Any:
    return getattr(style, name) if style is not None else None


def _style(config: WorkflowGeneratorConfig, request: RenderRequest) -> StyleConfig | None:
    if request.style is None or not config.styles:
        return None  # no styles configured: the service lists style among the ignored parameters
    style = config.styles.get(request.style)
    if style is None:
        known = ", ".join(sorted(config.styles))
        raise InvalidRequest(f"unknown style {request.style!r}; configured styles: {known}")
    return style


def _place_images(graph: Graph, workflow: CompiledWorkflow, references: Sequence[str], depth: str | None) -> None:
    if len(references) > len(workflow.references):
        slots = len(workflow.references)
        raise Unsupported(
            f"workflow {workflow.name!r} has an input for {slots} reference image(s), not {len(references)}; "
            "map reference_images to LoadImage inputs in its config"
        )
    for index, slot in enumerate(workflow.references):
        for ref in slot:
            if index < len(references):
                set_input(graph, ref, references[index])
            elif PLACEHOLDER.search(str(graph[ref.node]["inputs"][ref.input])):
                raise InvalidRequest(f"workflow {workflow.name!r} needs reference image {index + 1}")
    if depth is not None and not workflow.depth_map:
        raise Unsupported(f"workflow {workflow.name!r} takes no depth map")
    for ref in workflow.depth_map:
        if depth is not None:
            set_input(graph, ref, depth)
        elif PLACEHOLDER.search(str(graph[ref.node]["inputs"][ref.input])):
            raise InvalidRequest(f"workflow {workflow.name!r} needs a depth map")


def _stack(
    graph: Graph, workflow: CompiledWorkflow, style: StyleConfig | None, request: RenderRequest
) -> list[dict[str, object]]:
    for spec in request.loras:
        if "://" in spec.name:
            raise Unsupported(
                f"LoRA {spec.name[:80]!r} is a URL; this server loads LoRAs by file name from its models/loras folder"
            )
        if spec.name.startswith(("/", "\\")) or ".." in spec.name.replace("\\", "/").split("/"):
            raise InvalidRequest(f"LoRA name {spec.name[:80]!r} must be a file name under the server's loras folder")
    try:
        stack = plan_stack(style, request.loras)
    except StackTooLong as exc:
        raise InvalidRequest(str(exc)) from None
    if not stack:
        return []
    if workflow.spec.lora_stack_node is not None:
        try:
            fill_stack_node(graph, stack, workflow.spec.lora_stack_node)
        except StackTooLong as exc:
            raise InvalidRequest(str(exc)) from None
    elif workflow.lora_sources is not None:
        insert_loaders(graph, stack, workflow.lora_sources)
    else:
        raise Unsupported(f"workflow {workflow.name!r} has no model loader to attach LoRAs to")
    return [entry.as_applied() for entry in stack]
