"""Loading a pipeline onto its device: imports torch and diffusers (only ever from ``open``).

Everything here blocks for seconds to minutes on real checkpoints: it runs on the generator's
worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import diffusers
import torch

from image_server.errors import GeneratorUnavailable
from image_server.generators.diffusers.config import DiffusersConfig
from image_server.generators.diffusers.model_folder import ModelFolder, resolve
from image_server.generators.diffusers.plan import first_line

# Scheduler names in config -> (diffusers class, extra config).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Loaded:
    pipe: Any  # a DiffusionPipeline subclass (diffusers ships no type information)
    controlnet: Any | None
    device: str
    dtype: torch.dtype


def choose_device(wanted: str) -> str:
    if wanted != "auto":
        return wanted
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def choose_dtype(wanted: str, device: str, family: str) -> torch.dtype:
    """Half precision on accelerators (bf16 for FLUX, which overflows in fp16); fp32 on the CPU,
    where half precision is slow or unsupported."""
    if wanted != "auto":
        return DTYPES[wanted]
    if device == "cpu":
        return torch.float32
    return torch.bfloat16 if family == "flux" else torch.float16


def load(config: DiffusersConfig, folder: ModelFolder, generator: str) -> Loaded:
    device = choose_device(config.device)
    if device == "cuda" and not torch.cuda.is_available():
        raise GeneratorUnavailable(
            f"generator {generator!r}: device = 'cuda' but torch sees no CUDA device", generator=generator
        )
    dtype = choose_dtype(config.dtype, device, folder.family)
    try:
        pipeline_class: Any = diffusers.DiffusionPipeline  # diffusers is untyped
        pipe = pipeline_class.from_pretrained(folder.path, dtype=dtype, local_files_only=True)
        controlnet = _load_controlnet(config, folder, dtype, generator) if config.controlnet else None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise GeneratorUnavailable(
            f"generator {generator!r}: cannot load the pipeline in {folder.path}: {first_line(exc)}",
            generator=generator,
            retryable=False,
        ) from exc
    if config.scheduler != "default" or config.timestep_spacing:
        pipe.scheduler = _scheduler(pipe.scheduler, config)
    pipe.set_progress_bar_config(disable=True)
    if config.cpu_offload and device != "cpu":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
        if controlnet is not None:
            controlnet.to(device)
    if config.attention_slicing:
        pipe.enable_attention_slicing()
    if config.compile:
        denoiser = "transformer" if folder.family == "flux" else "unet"
        setattr(pipe, denoiser, torch.compile(getattr(pipe, denoiser)))
    return Loaded(pipe, controlnet, device, dtype)


def _load_controlnet(config: DiffusersConfig, folder: ModelFolder, dtype: torch.dtype, generator: str) -> Any:
    assert config.controlnet is not None
    path = resolve(config.controlnet, revision=None, generator=generator, what="controlnet")
    model_class: Any = diffusers.FluxControlNetModel if folder.family == "flux" else diffusers.ControlNetModel
    return model_class.from_pretrained(path, dtype=dtype, local_files_only=True)


def _scheduler(current: Any, config: DiffusersConfig) -> Any:
    class_name, extra = SCHEDULERS.get(config.scheduler, (type(current).__name__, {}))
    if config.timestep_spacing:
        extra = {**extra, "timestep_spacing": config.timestep_spacing}
    return getattr(diffusers, class_name).from_config(current.config, **extra)
