"""InvokeAI graphs per family: node types, fields and the exact edges, checked against the fake's
copy of InvokeAI's own graph validation (which must accept every graph we build)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from image_server.generators.invokeai.graph import GraphSpec, ModelRef, build_graph, round_size
from tests.fakes.invokeai_schema import GraphRejected, missing_inputs, validate_graph

SD15 = ModelRef("k-sd15", "blake3:a", "Dreamshaper 8", "sd-1", "main")
SDXL = ModelRef("k-sdxl", "blake3:b", "Juggernaut XL", "sdxl", "main")
FLUX = ModelRef("k-flux", "blake3:c", "FLUX Schnell", "flux", "main", variant="schnell")
T5 = ModelRef("k-t5", "blake3:d", "t5", "any", "t5_encoder")
CLIP = ModelRef("k-clip", "blake3:e", "clip-l", "any", "clip_embed")
VAE = ModelRef("k-vae", "blake3:f", "ae", "flux", "vae")
LORA_A = ModelRef("k-la", "blake3:g", "A", "sd-1", "lora")
LORA_B = ModelRef("k-lb", "blake3:h", "B", "sd-1", "lora")


def spec(family: str = "sd1", **fields) -> GraphSpec:
    model = {"sd1": SD15, "sdxl": SDXL, "flux": FLUX}[family]
    base = dict(family=family, model=model, prompt="a fox", negative_prompt="blur", width=512, height=768, steps=20)
    base |= dict(seed=42, cfg_scale=7.0 if family != "flux" else None, guidance=3.5 if family == "flux" else None)
    if family == "flux":
        base["flux_components"] = (T5, CLIP, VAE)
    return GraphSpec(**(base | fields))


def edges(graph) -> set[tuple[str, str, str, str]]:
    return {
        (e["source"]["node_id"], e["source"]["field"], e["destination"]["node_id"], e["destination"]["field"])
        for e in graph["edges"]
    }


def types(graph) -> dict[str, str]:
    return {node_id: node["type"] for node_id, node in graph["nodes"].items()}


def accepted(graph) -> dict:
    """The fake's InvokeAI validation accepts it, ignores no field and finds no missing input."""
    assert validate_graph(graph) == []
    assert missing_inputs(graph) is None
    return graph


def test_sd15_text_to_image_graph() -> None:
    graph = accepted(build_graph(spec(scheduler="dpmpp_2m"), "g1"))
    assert graph["id"] == "g1"
    assert types(graph) == {
        "seed": "integer",
        "model_loader": "main_model_loader",
        "positive": "compel",
        "negative": "compel",
        "noise": "noise",
        "denoise": "denoise_latents",
        "output": "l2i",
    }
    assert edges(graph) == {
        ("model_loader", "clip", "positive", "clip"),
        ("model_loader", "clip", "negative", "clip"),
        ("model_loader", "unet", "denoise", "unet"),
        ("seed", "value", "noise", "seed"),
        ("positive", "conditioning", "denoise", "positive_conditioning"),
        ("negative", "conditioning", "denoise", "negative_conditioning"),
        ("noise", "noise", "denoise", "noise"),
        ("denoise", "latents", "output", "latents"),
        ("model_loader", "vae", "output", "vae"),
    }
    nodes = graph["nodes"]
    assert nodes["model_loader"]["model"] == {
        "key": "k-sd15", "hash": "blake3:a", "name": "Dreamshaper 8", "base": "sd-1", "type": "main"
    }  # fmt: skip
    assert nodes["positive"]["prompt"] == "a fox" and nodes["negative"]["prompt"] == "blur"
    assert nodes["seed"]["value"] == 42
    assert (nodes["noise"]["width"], nodes["noise"]["height"]) == (512, 768)
    assert (
        nodes["denoise"].items()
        >= {"steps": 20, "cfg_scale": 7.0, "scheduler": "dpmpp_2m", "denoising_start": 0.0}.items()
    )
    # Only the output lands in the gallery; it is never served from InvokeAI's node cache.
    assert [n for n, node in nodes.items() if not node["is_intermediate"]] == ["output"]
    assert nodes["output"]["use_cache"] is False and "board" not in nodes["output"]


def test_sdxl_graph_feeds_both_text_encoders() -> None:
    graph = accepted(build_graph(spec("sdxl", width=1024, height=1024, board_id="b-1"), "g"))
    assert types(graph)["model_loader"] == "sdxl_model_loader"
    assert types(graph)["positive"] == types(graph)["negative"] == "sdxl_compel_prompt"
    assert {
        ("model_loader", "clip", "positive", "clip"),
        ("model_loader", "clip2", "positive", "clip2"),
        ("model_loader", "clip", "negative", "clip"),
        ("model_loader", "clip2", "negative", "clip2"),
        ("model_loader", "unet", "denoise", "unet"),
    } <= edges(graph)
    positive = graph["nodes"]["positive"]
    assert positive["style"] == positive["prompt"] == "a fox"
    assert positive["target_width"] == positive["original_width"] == 1024
    assert graph["nodes"]["output"]["board"] == {"board_id": "b-1"}


def test_flux_graph_has_no_negative_prompt_and_wires_its_components() -> None:
    graph = accepted(build_graph(spec("flux", width=1024, height=1024), "g"))
    assert types(graph) == {
        "seed": "integer",
        "model_loader": "flux_model_loader",
        "positive": "flux_text_encoder",
        "denoise": "flux_denoise",
        "output": "flux_vae_decode",
    }
    assert edges(graph) == {
        ("model_loader", "clip", "positive", "clip"),
        ("model_loader", "t5_encoder", "positive", "t5_encoder"),
        ("model_loader", "max_seq_len", "positive", "t5_max_seq_len"),
        ("model_loader", "transformer", "denoise", "transformer"),
        ("positive", "conditioning", "denoise", "positive_text_conditioning"),
        ("seed", "value", "denoise", "seed"),
        ("denoise", "latents", "output", "latents"),
        ("model_loader", "vae", "output", "vae"),
    }
    loader = graph["nodes"]["model_loader"]
    assert (loader["t5_encoder_model"]["key"], loader["clip_embed_model"]["key"], loader["vae_model"]["key"]) == (
        "k-t5",
        "k-clip",
        "k-vae",
    )
    assert (
        graph["nodes"]["denoise"].items() >= {"num_steps": 20, "guidance": 3.5, "width": 1024, "height": 1024}.items()
    )


def test_loras_are_chained_between_the_loader_and_every_consumer() -> None:
    graph = accepted(build_graph(spec(loras=((LORA_A, 0.8), (LORA_B, -0.5))), "g"))
    assert types(graph)["lora_1"] == types(graph)["lora_2"] == "lora_loader"
    assert graph["nodes"]["lora_1"]["lora"]["key"] == "k-la" and graph["nodes"]["lora_1"]["weight"] == 0.8
    assert graph["nodes"]["lora_2"]["weight"] == -0.5
    wired = edges(graph)
    assert {
        ("model_loader", "unet", "lora_1", "unet"),
        ("model_loader", "clip", "lora_1", "clip"),
        ("lora_1", "unet", "lora_2", "unet"),
        ("lora_1", "clip", "lora_2", "clip"),
        ("lora_2", "unet", "denoise", "unet"),
        ("lora_2", "clip", "positive", "clip"),
        ("lora_2", "clip", "negative", "clip"),
    } <= wired
    # Nothing consumes the loader's UNet or CLIP directly any more; the VAE still comes from it.
    assert not {e for e in wired if e[0] == "model_loader" and e[2] not in ("lora_1",) and e[1] != "vae"}


@pytest.mark.parametrize(
    ("family", "loader", "through"),
    [
        ("sdxl", "sdxl_lora_loader", ("unet", "clip", "clip2")),
        ("flux", "flux_lora_loader", ("transformer", "clip", "t5_encoder")),
    ],
)
def test_lora_loaders_per_family(family: str, loader: str, through: tuple[str, ...]) -> None:
    lora = replace(LORA_A, base={"sdxl": "sdxl", "flux": "flux"}[family])
    graph = accepted(build_graph(spec(family, width=1024, height=1024, loras=((lora, 1.0),)), "g"))
    assert types(graph)["lora_1"] == loader
    assert {("model_loader", field, "lora_1", field) for field in through} <= edges(graph)
    assert not [e for e in edges(graph) if e[0] == "model_loader" and e[1] in through and e[2] != "lora_1"]


@pytest.mark.parametrize(("family", "encoder"), [("sd1", "i2l"), ("sdxl", "i2l"), ("flux", "flux_vae_encode")])
def test_image_to_image_resizes_encodes_and_starts_part_way(family: str, encoder: str) -> None:
    graph = accepted(build_graph(spec(family, width=1024, height=512, init_image="ref.png", strength=0.3), "g"))
    nodes = graph["nodes"]
    assert types(graph)["init_resize"] == "img_resize" and types(graph)["init_encode"] == encoder
    assert nodes["init_resize"].items() >= {"image": {"image_name": "ref.png"}, "width": 1024, "height": 512}.items()
    assert {
        ("init_resize", "image", "init_encode", "image"),
        ("model_loader", "vae", "init_encode", "vae"),
        ("init_encode", "latents", "denoise", "latents"),
    } <= edges(graph)
    assert nodes["denoise"]["denoising_start"] == pytest.approx(0.7)
    assert nodes["init_resize"]["is_intermediate"] is True  # the resized reference stays out of the gallery


def test_the_fake_rejects_what_invokeai_rejects() -> None:
    good = build_graph(spec(), "g")
    bad_size = build_graph(spec(width=500), "g")  # noise sizes must be multiples of 8
    with pytest.raises(GraphRejected, match="multiple of 8"):
        validate_graph(bad_size)
    wrong_edge = {**good, "edges": [*good["edges"], dict(good["edges"][0])]}
    with pytest.raises(GraphRejected, match="already exists"):
        validate_graph(wrong_edge)
    mistyped = {**good, "nodes": {**good["nodes"], "noise": {**good["nodes"]["noise"], "type": "noize"}}}
    with pytest.raises(GraphRejected, match="noize"):
        validate_graph(mistyped)


def test_sizes_round_to_the_latent_step() -> None:
    assert (round_size(500, "sd1"), round_size(500, "flux"), round_size(3, "flux")) == (504, 496, 16)
