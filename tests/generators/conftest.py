"""Fixtures shared by the generator tests."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class TinyModels:
    sd: Path
    sdxl: Path
    flux: Path
    controlnet: Path
    loras: Path
    corrupt: Path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """Tiny random diffusers pipelines, built once per test run (torch is imported only here)."""
    from tests.generators.tiny_diffusers import build_controlnet, build_flux, build_lora, build_sd, build_sdxl

    root = tmp_path_factory.mktemp("tiny-diffusers")
    sd = build_sd(root / "sd")
    build_lora(sd, root / "loras" / "ink.safetensors")
    corrupt = root / "corrupt"
    shutil.copytree(sd, corrupt)
    weights = next((corrupt / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])  # a download cut short
    return TinyModels(
        sd=sd,
        sdxl=build_sdxl(root / "sdxl"),
        flux=build_flux(root / "flux"),
        controlnet=build_controlnet(sd, root / "controlnet"),
        loras=root / "loras",
        corrupt=corrupt,
    )
