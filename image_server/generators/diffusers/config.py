"""Configuration of the in-process diffusers strategy (no torch import here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from image_server.generators.base import GeneratorConfig

Family = Literal["auto", "sd15", "sdxl", "flux"]
Device = Literal["auto", "cuda", "cpu", "mps"]
DType = Literal["auto", "fp16", "bf16", "fp32"]
SchedulerName = Literal[
    "default", "euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "lcm", "heun", "pndm"
]
TimestepSpacing = Literal["leading", "trailing", "linspace"]

# "org/name" with Hugging Face's characters: looked up in the local HF cache, never downloaded.
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


class DiffusersConfig(GeneratorConfig):
    """``[generators.<name>]`` with ``strategy = "diffusers"``.

    ``model`` is a local pipeline folder (with ``model_index.json``) or a Hugging Face repo id
    that is already in the local cache. Nothing is downloaded at run time.
    """

    # Every field decides what is loaded; a per-request override would load a second copy.
    OVERRIDABLE: ClassVar[frozenset[str]] = frozenset()

    strategy: Literal["diffusers"] = "diffusers"
    # One pipeline renders one image at a time: requests wait in the scheduler's queue (with their
    # queue position reported) rather than inside the generator.
    concurrency: int = Field(default=1, ge=1, le=64)
    timeout_s: float = Field(default=600.0, gt=0, le=3600)
    retries: int = Field(default=1, ge=0, le=10)
    model: str = Field(min_length=1)
    family: Family = "auto"
    revision: str | None = None  # a cached snapshot of a repo id; the newest cached one if unset
    device: Device = "auto"
    dtype: DType = "auto"
    scheduler: SchedulerName = "default"
    timestep_spacing: TimestepSpacing | None = None  # "trailing" for few-step (turbo/lightning) checkpoints
    default_steps: int | None = Field(default=None, ge=1, le=200)
    default_guidance_scale: float | None = Field(default=None, ge=0, le=50)
    default_size: int | None = Field(default=None, ge=64, le=4096)
    controlnet: str | None = None  # a depth ControlNet (folder or cached repo id), used when a request has a depth_map
    controlnet_scale: float = Field(default=1.0, ge=0, le=4)
    lora_dir: Path | None = None  # LoRAs by name: <lora_dir>/<name>.safetensors (a missing one fails its request)
    preload: bool = False  # load at start-up instead of on the first request
    cpu_offload: bool = False  # enable_model_cpu_offload: less GPU memory, slower
    attention_slicing: bool = False
    compile: bool = False  # torch.compile the denoiser: slow first render, faster later ones

    @model_validator(mode="after")
    def _local_paths_exist(self) -> DiffusersConfig:
        """A path that is not a repo id must exist now, so a typo fails at start-up."""
        for field, value in (("model", self.model), ("controlnet", self.controlnet)):
            if value is not None and not REPO_ID.fullmatch(value) and not Path(value).expanduser().is_dir():
                raise ValueError(f"{field} folder {value} does not exist")
        return self
