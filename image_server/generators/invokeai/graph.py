"""InvokeAI graphs for text-to-image and image-to-image, per model family (SD1/SD2, SDXL, FLUX.1).

The node types and field names are InvokeAI's own invocations, as its web UI wires them
(``main_model_loader`` / ``sdxl_model_loader`` / ``flux_model_loader``, ``compel``,
``noise``, ``denoise_latents``, ``l2i``, ``flux_denoise``, ...), limited to those present
since InvokeAI 4.0 (FLUX since 5.0) so one graph works on v4, v5 and v6 servers. LoRAs are
a chain of per-family LoRA loader nodes between the model loader and its consumers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Family = Literal["sd1", "sdxl", "flux"]
FAMILY_OF_BASE: dict[str, Family] = {"sd-1": "sd1", "sd-2": "sd1", "sdxl": "sdxl", "flux": "flux"}
# Latent sizes are multiples of 8 (SD) or 16 (FLUX, packed 2x2 latents); the server refuses others.
SIZE_STEP: dict[Family, int] = {"sd1": 8, "sdxl": 8, "flux": 16}
LORA_LOADER: dict[Family, str] = {"sd1": "lora_loader", "sdxl": "sdxl_lora_loader", "flux": "flux_lora_loader"}
# The model-loader outputs each family's LoRA loader takes in and passes on.
LORA_THROUGH: dict[Family, tuple[str, ...]] = {
    "sd1": ("unet", "clip"),
    "sdxl": ("unet", "clip", "clip2"),
    "flux": ("transformer", "clip", "t5_encoder"),
}
SEED_MAX = 2**32 - 1  # InvokeAI seeds are uint32
OUTPUT_NODE = "output"
SEED_NODE = "seed"


@dataclass(frozen=True)
class ModelRef:
    """One model record from ``/api/v2/models/``, as much of it as a graph needs."""

    key: str
    hash: str
    name: str
    base: str
    type: str
    variant: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def identifier(self) -> dict[str, Any]:
        """InvokeAI's ``ModelIdentifierField``."""
        return {"key": self.key, "hash": self.hash, "name": self.name, "base": self.base, "type": self.type}


@dataclass(frozen=True)
class GraphSpec:
    """Everything one graph needs, already resolved and bounded."""

    family: Family
    model: ModelRef
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    seed: int
    cfg_scale: float | None = None  # SD1 / SDXL
    guidance: float | None = None  # FLUX
    scheduler: str | None = None
    loras: tuple[tuple[ModelRef, float], ...] = ()
    init_image: str | None = None  # an uploaded image's name: image-to-image
    strength: float = 0.75
    board_id: str | None = None
    flux_components: tuple[ModelRef, ModelRef, ModelRef] | None = None  # T5 encoder, CLIP embed, VAE


class GraphBuilder:
    """Nodes and edges in InvokeAI's graph shape (``{"id", "nodes": {id: node}, "edges": [...]}``)."""

    def __init__(self, graph_id: str) -> None:
        self.graph_id = graph_id
        self.nodes: dict[str, dict[str, Any]] = {}
        self.edges: list[dict[str, Any]] = []

    def node(self, node_id: str, node_type: str, **fields: Any) -> str:
        self.nodes[node_id] = {"id": node_id, "type": node_type, "is_intermediate": True, **fields}
        return node_id

    def edge(self, source: str, source_field: str, destination: str, destination_field: str) -> None:
        self.edges.append(
            {
                "source": {"node_id": source, "field": source_field},
                "destination": {"node_id": destination, "field": destination_field},
            }
        )

    def build(self) -> dict[str, Any]:
        return {"id": self.graph_id, "nodes": self.nodes, "edges": self.edges}


def round_size(value: int, family: Family) -> int:
    step = SIZE_STEP[family]
    return max(step, (value + step // 2) // step * step)  # half up, not Python's half-to-even


def build_graph(spec: GraphSpec, graph_id: str) -> dict[str, Any]:
    """The whole graph for ``spec``; its one non-intermediate image node is ``OUTPUT_NODE``."""
    g = GraphBuilder(graph_id)
    g.node(SEED_NODE, "integer", value=spec.seed)
    loader = _model_loader(g, spec)
    sources = _chain_loras(g, spec, loader)
    output_fields: dict[str, Any] = {"is_intermediate": False, "use_cache": False}
    if spec.board_id is not None:
        output_fields["board"] = {"board_id": spec.board_id}
    if spec.family == "flux":
        denoise = _flux_denoise(g, spec, loader, sources)
        g.node(OUTPUT_NODE, "flux_vae_decode", **output_fields)
    else:
        denoise = _sd_denoise(g, spec, sources)
        g.node(OUTPUT_NODE, "l2i", **output_fields)
    g.edge(denoise, "latents", OUTPUT_NODE, "latents")
    g.edge(loader, "vae", OUTPUT_NODE, "vae")
    if spec.init_image is not None:
        _image_to_image(g, spec, loader, denoise)
    return g.build()


def _model_loader(g: GraphBuilder, spec: GraphSpec) -> str:
    if spec.family == "flux":
        if spec.flux_components is None:
            raise ValueError("a FLUX graph needs its T5 encoder, CLIP embed and VAE models")
        t5, clip, vae = spec.flux_components
        return g.node(
            "model_loader",
            "flux_model_loader",
            model=spec.model.identifier(),
            t5_encoder_model=t5.identifier(),
            clip_embed_model=clip.identifier(),
            vae_model=vae.identifier(),
        )
    kind = "sdxl_model_loader" if spec.family == "sdxl" else "main_model_loader"
    return g.node("model_loader", kind, model=spec.model.identifier())


def _chain_loras(g: GraphBuilder, spec: GraphSpec, loader: str) -> dict[str, str]:
    """Insert one LoRA loader per LoRA; returns, per model output, the node that now provides it."""
    through = LORA_THROUGH[spec.family]
    sources = dict.fromkeys(through, loader)
    for number, (lora, weight) in enumerate(spec.loras, start=1):
        node = g.node(f"lora_{number}", LORA_LOADER[spec.family], lora=lora.identifier(), weight=weight)
        for output in through:
            g.edge(sources[output], output, node, output)
            sources[output] = node
    return sources


def _sd_denoise(g: GraphBuilder, spec: GraphSpec, sources: dict[str, str]) -> str:
    """Prompt encoders, noise and ``denoise_latents`` for SD1/SD2 and SDXL."""
    for node_id, text in (("positive", spec.prompt), ("negative", spec.negative_prompt)):
        if spec.family == "sdxl":
            # SDXL's second text encoder gets the same text as its "style" prompt, as InvokeAI's UI does.
            size = {"original_width": spec.width, "original_height": spec.height, "crop_top": 0, "crop_left": 0}
            size |= {"target_width": spec.width, "target_height": spec.height}
            g.node(node_id, "sdxl_compel_prompt", prompt=text, style=text, **size)
            g.edge(sources["clip2"], "clip2", node_id, "clip2")
        else:
            g.node(node_id, "compel", prompt=text)
        g.edge(sources["clip"], "clip", node_id, "clip")
    g.node("noise", "noise", width=spec.width, height=spec.height, use_cpu=True)
    g.edge(SEED_NODE, "value", "noise", "seed")
    fields: dict[str, Any] = {"steps": spec.steps, "cfg_scale": spec.cfg_scale, "denoising_start": 0.0}
    fields["denoising_end"] = 1.0
    if spec.scheduler is not None:
        fields["scheduler"] = spec.scheduler
    denoise = g.node("denoise", "denoise_latents", **fields)
    g.edge("positive", "conditioning", denoise, "positive_conditioning")
    g.edge("negative", "conditioning", denoise, "negative_conditioning")
    g.edge("noise", "noise", denoise, "noise")
    g.edge(sources["unet"], "unet", denoise, "unet")
    return denoise


def _flux_denoise(g: GraphBuilder, spec: GraphSpec, loader: str, sources: dict[str, str]) -> str:
    """``flux_text_encoder`` and ``flux_denoise``: FLUX.1 takes no negative prompt and no noise node."""
    g.node("positive", "flux_text_encoder", prompt=spec.prompt)
    g.edge(sources["clip"], "clip", "positive", "clip")
    g.edge(sources["t5_encoder"], "t5_encoder", "positive", "t5_encoder")
    g.edge(loader, "max_seq_len", "positive", "t5_max_seq_len")
    fields: dict[str, Any] = {"width": spec.width, "height": spec.height, "num_steps": spec.steps}
    fields |= {"guidance": spec.guidance, "denoising_start": 0.0, "denoising_end": 1.0}
    if spec.scheduler is not None:
        fields["scheduler"] = spec.scheduler
    denoise = g.node("denoise", "flux_denoise", **fields)
    g.edge(SEED_NODE, "value", denoise, "seed")
    g.edge(sources["transformer"], "transformer", denoise, "transformer")
    g.edge("positive", "conditioning", denoise, "positive_text_conditioning")
    return denoise


def _image_to_image(g: GraphBuilder, spec: GraphSpec, loader: str, denoise: str) -> None:
    """Resize the uploaded image to the render size, encode it, and start denoising part-way."""
    g.node("init_resize", "img_resize", image={"image_name": spec.init_image}, width=spec.width, height=spec.height)
    encoder = "flux_vae_encode" if spec.family == "flux" else "i2l"
    g.node("init_encode", encoder)
    g.edge("init_resize", "image", "init_encode", "image")
    g.edge(loader, "vae", "init_encode", "vae")
    g.edge("init_encode", "latents", denoise, "latents")
    g.nodes[denoise]["denoising_start"] = round(1.0 - spec.strength, 4)
