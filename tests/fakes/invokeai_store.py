"""The fake InvokeAI's installed models: records shaped like ``GET /api/v2/models/`` answers."""

from __future__ import annotations

from typing import Any


def record(key: str, name: str, base: str, kind: str, **extra: Any) -> dict[str, Any]:
    fmt = "diffusers" if kind == "main" else "lycoris" if kind == "lora" else "checkpoint"
    return {
        "key": key,
        "hash": f"blake3:{key}",
        "name": name,
        "base": base,
        "type": kind,
        "format": fmt,
        "path": f"{base}/{kind}/{name}",
        "description": None,
        "source": name,
        "file_size": 1234,
        "default_settings": None,
        **extra,
    }


MODELS: list[dict[str, Any]] = [
    record(
        "k-sd15",
        "Dreamshaper 8",
        "sd-1",
        "main",
        default_settings={"steps": 25, "cfg_scale": 6.5, "scheduler": "dpmpp_2m", "width": 512, "height": 768},
    ),
    record("k-sdxl", "Juggernaut XL v9", "sdxl", "main", variant="normal"),
    record("k-flux", "FLUX Schnell (Quantized)", "flux", "main", variant="schnell", format="bnb_quantized_nf4b"),
    record("k-flux-dev", "FLUX Dev", "flux", "main", variant="dev", default_settings={"guidance": 3.5}),
    record("k-sd3", "SD3.5 Medium", "sd-3", "main"),
    record("k-twin-1", "Twin", "sd-1", "main"),
    record("k-twin-x", "Twin", "sdxl", "main"),
    record("k-lora-sd", "Detail Tweaker", "sd-1", "lora"),
    record("k-lora-sd2", "Film Grain", "sd-1", "lora"),
    record("k-lora-xl", "Pixel Art XL", "sdxl", "lora"),
    record("k-lora-flux", "Flux Realism", "flux", "lora"),
    record("k-t5", "t5_bnb_int8_quantized_encoder", "any", "t5_encoder"),
    record("k-clip", "clip-vit-large-patch14", "any", "clip_embed"),
    record("k-vae-xl", "sdxl-vae-fp16-fix", "sdxl", "vae"),
    record("k-vae-flux", "FLUX.1-schnell_ae", "flux", "vae"),
]


class ModelStore:
    def __init__(self, models: list[dict[str, Any]]) -> None:
        self.models = models

    def by_key(self, key: str) -> dict[str, Any] | None:
        return next((m for m in self.models if m["key"] == key), None)

    def remove(self, key: str) -> None:
        self.models = [m for m in self.models if m["key"] != key]

    def search(self, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        """``model_type``, ``base_models`` (repeatable), ``model_name``: exact matches, as the real one."""
        found = self.models
        if "model_type" in query:
            found = [m for m in found if m["type"] == query["model_type"][0]]
        if "base_models" in query:
            found = [m for m in found if m["base"] in query["base_models"]]
        if "model_name" in query:
            found = [m for m in found if m["name"] == query["model_name"][0]]
        return sorted(found, key=lambda m: m["name"])
