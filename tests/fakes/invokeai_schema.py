"""The invocations a fake InvokeAI knows, and its graph checks, after InvokeAI's own.

``validate_graph`` raises ``GraphRejected`` (the fake's 422) where the real server's pydantic
validation of a ``Batch`` fails: an unknown node type, a node id that does not match its key,
a direct field of the wrong type or not a multiple of the latent step, an edge naming a
missing node or field, incompatible field types, two edges into one input, a cycle.
``missing_inputs`` is what the real server only finds when it runs the node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MODEL = "ModelIdentifierField"
NODE_ATTRIBUTES = {"id", "type", "is_intermediate", "use_cache"}


@dataclass(frozen=True)
class Invocation:
    inputs: dict[str, str]
    outputs: dict[str, str]
    required: tuple[str, ...] = ()
    multiple_of: dict[str, int] = field(default_factory=dict)
    makes_image: bool = False


def _loader(outputs: dict[str, str], **models: str) -> Invocation:
    return Invocation(dict(models), outputs, required=tuple(models))


_SD_OUT = {"unet": "UNetField", "clip": "CLIPField", "vae": "VAEField"}
_FLUX_OUT = {"transformer": "TransformerField", "clip": "CLIPField", "t5_encoder": "T5EncoderField"}
_SDXL_SIZES = {k: "int" for k in ("original_width", "original_height", "crop_top", "crop_left")}
_SDXL_SIZES |= {"target_width": "int", "target_height": "int"}
_LATENTS_OUT = {"latents": "LatentsField", "width": "int", "height": "int"}
_IMAGE_OUT = {"image": "ImageField", "width": "int", "height": "int"}
_BOARD = {"board": "BoardField", "metadata": "MetadataField"}

INVOCATIONS: dict[str, Invocation] = {
    "integer": Invocation({"value": "int"}, {"value": "int"}),
    "string": Invocation({"value": "str"}, {"value": "str"}),
    "main_model_loader": _loader(_SD_OUT, model=MODEL),
    "sdxl_model_loader": _loader(_SD_OUT | {"clip2": "CLIPField"}, model=MODEL),
    "flux_model_loader": Invocation(
        {"model": MODEL, "t5_encoder_model": MODEL, "clip_embed_model": MODEL, "vae_model": MODEL},
        _FLUX_OUT | {"vae": "VAEField", "max_seq_len": "int"},
        required=("model",),
    ),
    "lora_loader": Invocation(
        {"lora": MODEL, "weight": "float", "unet": "UNetField", "clip": "CLIPField"},
        {"unet": "UNetField", "clip": "CLIPField"},
        required=("lora",),
    ),
    "sdxl_lora_loader": Invocation(
        {"lora": MODEL, "weight": "float", "unet": "UNetField", "clip": "CLIPField", "clip2": "CLIPField"},
        {"unet": "UNetField", "clip": "CLIPField", "clip2": "CLIPField"},
        required=("lora",),
    ),
    "flux_lora_loader": Invocation(
        {"lora": MODEL, "weight": "float", **_FLUX_OUT}, dict(_FLUX_OUT), required=("lora",)
    ),
    "compel": Invocation(
        {"prompt": "str", "clip": "CLIPField", "mask": "TensorField"},
        {"conditioning": "ConditioningField"},
        required=("prompt", "clip"),
    ),
    "sdxl_compel_prompt": Invocation(
        {"prompt": "str", "style": "str", "clip": "CLIPField", "clip2": "CLIPField", **_SDXL_SIZES},
        {"conditioning": "ConditioningField"},
        required=("clip", "clip2"),
    ),
    "flux_text_encoder": Invocation(
        {"clip": "CLIPField", "t5_encoder": "T5EncoderField", "t5_max_seq_len": "int", "prompt": "str"},
        {"conditioning": "FluxConditioningField"},
        required=("clip", "t5_encoder", "t5_max_seq_len", "prompt"),
    ),
    "noise": Invocation(
        {"seed": "int", "width": "int", "height": "int", "use_cpu": "bool"},
        {"noise": "LatentsField", "width": "int", "height": "int"},
        multiple_of={"width": 8, "height": 8},
    ),
    "denoise_latents": Invocation(
        {
            "positive_conditioning": "ConditioningField",
            "negative_conditioning": "ConditioningField",
            "noise": "LatentsField",
            "latents": "LatentsField",
            "unet": "UNetField",
            "steps": "int",
            "cfg_scale": "float",
            "denoising_start": "float",
            "denoising_end": "float",
            "scheduler": "str",
        },
        dict(_LATENTS_OUT),
        required=("positive_conditioning", "negative_conditioning", "unet"),
    ),
    "flux_denoise": Invocation(
        {
            "latents": "LatentsField",
            "transformer": "TransformerField",
            "positive_text_conditioning": "FluxConditioningField",
            "width": "int",
            "height": "int",
            "num_steps": "int",
            "guidance": "float",
            "seed": "int",
            "denoising_start": "float",
            "denoising_end": "float",
            "scheduler": "str",
        },
        dict(_LATENTS_OUT),
        required=("transformer", "positive_text_conditioning"),
        multiple_of={"width": 16, "height": 16},
    ),
    "l2i": Invocation(
        {"latents": "LatentsField", "vae": "VAEField", "fp32": "bool", **_BOARD},
        dict(_IMAGE_OUT),
        required=("latents", "vae"),
        makes_image=True,
    ),
    "flux_vae_decode": Invocation(
        {"latents": "LatentsField", "vae": "VAEField", **_BOARD}, dict(_IMAGE_OUT), ("latents", "vae"), makes_image=True
    ),
    "i2l": Invocation({"image": "ImageField", "vae": "VAEField", "fp32": "bool"}, dict(_LATENTS_OUT), ("image", "vae")),
    "flux_vae_encode": Invocation({"image": "ImageField", "vae": "VAEField"}, dict(_LATENTS_OUT), ("image", "vae")),
    "img_resize": Invocation(
        {"image": "ImageField", "width": "int", "height": "int", "resample_mode": "str", **_BOARD},
        dict(_IMAGE_OUT),
        required=("image",),
        makes_image=True,
    ),
}
PYTHON_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


class GraphRejected(ValueError):
    """A 422: ``loc`` as FastAPI reports it, and pydantic's message."""

    def __init__(self, loc: list[Any], msg: str) -> None:
        super().__init__(msg)
        self.loc, self.msg = loc, msg


def validate_graph(graph: Any) -> list[str]:
    """Raise ``GraphRejected`` like the real server; return the direct fields it would silently ignore."""
    at = ["body", "batch", "graph"]
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), dict):
        raise GraphRejected(at + ["nodes"], "Input should be a valid dictionary")
    ignored: list[str] = []
    for key, node in graph["nodes"].items():
        if not isinstance(node, dict) or node.get("type") not in INVOCATIONS:
            tag = node.get("type") if isinstance(node, dict) else None
            raise GraphRejected(at + ["nodes", key], f"Input tag '{tag}' found using 'type' does not match any tag")
        if node.get("id") != key:
            raise GraphRejected(at, f"Value error, Node ids must match, got {key} and {node.get('id')}")
        ignored += _check_fields(node, INVOCATIONS[node["type"]], at + ["nodes", key])
    _check_edges(graph, at)
    return ignored


def _check_fields(node: dict[str, Any], spec: Invocation, at: list[Any]) -> list[str]:
    ignored = []
    for name, value in node.items():
        kind = spec.inputs.get(name)
        if name in NODE_ATTRIBUTES:
            continue
        if kind is None:
            ignored.append(f"{node['id']}.{name}")
            continue
        if kind in PYTHON_TYPES and (
            not isinstance(value, PYTHON_TYPES[kind]) or (kind != "bool" and isinstance(value, bool))
        ):
            raise GraphRejected(at + [name], f"Input should be a valid {kind}")
        if kind == MODEL and not (isinstance(value, dict) and all(isinstance(value.get(k), str) for k in _MODEL_KEYS)):
            raise GraphRejected(at + [name], "Field required: a model needs key, hash, name, base and type")
        step = spec.multiple_of.get(name)
        if step and value % step:
            raise GraphRejected(at + [name], f"Input should be a multiple of {step}")
    return ignored


_MODEL_KEYS = ("key", "hash", "name", "base", "type")


def _check_edges(graph: dict[str, Any], at: list[Any]) -> None:
    nodes = graph["nodes"]
    edges = graph.get("edges", [])
    if not isinstance(edges, list):
        raise GraphRejected(at + ["edges"], "Input should be a valid list")
    seen: set[tuple[str, str]] = set()
    children: dict[str, set[str]] = {key: set() for key in nodes}
    for edge in edges:
        try:
            source, destination = edge["source"], edge["destination"]
            src_id, src_field = source["node_id"], source["field"]
            dst_id, dst_field = destination["node_id"], destination["field"]
        except (KeyError, TypeError):
            raise GraphRejected(at + ["edges"], "Field required") from None
        if src_id not in nodes or dst_id not in nodes:
            raise GraphRejected(
                at, f"Value error, Edge node {src_id if src_id not in nodes else dst_id} does not exist"
            )
        out_kind = INVOCATIONS[nodes[src_id]["type"]].outputs.get(src_field)
        in_kind = INVOCATIONS[nodes[dst_id]["type"]].inputs.get(dst_field)
        if out_kind is None or in_kind is None:
            missing = f"source field {src_field}" if out_kind is None else f"destination field {dst_field}"
            raise GraphRejected(at, f"Value error, Edge {missing} does not exist in node")
        if out_kind != in_kind and not (out_kind == "int" and in_kind == "float"):
            raise GraphRejected(at, f"Value error, Edge source and target types do not match ({src_id}.{src_field})")
        if (dst_id, dst_field) in seen:
            raise GraphRejected(at, f"Value error, Edge already exists ({dst_id}.{dst_field})")
        seen.add((dst_id, dst_field))
        children[src_id].add(dst_id)
    _check_acyclic(children, at)


def _check_acyclic(children: dict[str, set[str]], at: list[Any]) -> None:
    state: dict[str, int] = {}

    def visit(node: str) -> None:
        state[node] = 1
        for child in children[node]:
            if state.get(child) == 1:
                raise GraphRejected(at, "Value error, Graph contains cycles")
            if child not in state:
                visit(child)
        state[node] = 2

    for node in children:
        if node not in state:
            visit(node)


def inputs_of(graph: dict[str, Any], node_id: str) -> set[str]:
    """The fields of ``node_id`` that are set directly or connected."""
    node = graph["nodes"][node_id]
    connected = {e["destination"]["field"] for e in graph["edges"] if e["destination"]["node_id"] == node_id}
    return {name for name in node if name not in NODE_ATTRIBUTES} | connected


def missing_inputs(graph: dict[str, Any]) -> str | None:
    """The first required input neither set nor connected (InvokeAI fails the item when it runs)."""
    for node_id, node in graph["nodes"].items():
        have = inputs_of(graph, node_id)
        for name in INVOCATIONS[node["type"]].required:
            if name not in have:
                return f"{node_id}.{name}: Field required"
    return None
