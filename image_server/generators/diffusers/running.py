"""Running one plan on the loaded pipeline: variants, LoRAs, seeds, steps, stop and OOM.

Imports torch; used only by an opened generator, always on its single worker thread, so the
pipeline is never touched by two renders at once.
"""

from __future__ import annotations

import gc
import inspect
import threading
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from image_server.errors import ContentPolicy
from image_server.generators.diffusers.loading import Loaded
from image_server.generators.diffusers.plan import BadLora, OutOfMemory, RenderPlan, Stopped, first_line

StepCallback = Callable[[int, int], None]  # (steps done, total steps)


class Runner:
    def __init__(self, loaded: Loaded, *, controlnet_scale: float = 1.0) -> None:
        self.loaded = loaded
        self.controlnet_scale = controlnet_scale
        self._variants: dict[str, Any] = {"t2i": loaded.pipe}
        self._adapters: set[str] = set()

    def render(self, plan: RenderPlan, stop: threading.Event, on_step: StepCallback) -> list[Image.Image]:
        if stop.is_set():
            raise Stopped
        pipe = self._variant(plan.kind)
        self._set_loras(plan)

        def step_end(pipeline: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if stop.is_set():
                raise Stopped
            on_step(index + 1, int(getattr(pipeline, "num_timesteps", 0) or plan.steps))
            return tensors

        try:
            with torch.inference_mode():
                output = pipe(**self._arguments(pipe, plan), callback_on_step_end=step_end)
        except torch.OutOfMemoryError as exc:
            raise OutOfMemory(first_line(exc)) from None
        finally:
            self._release()
        # A checkpoint that ships a safety checker blacks out what it flags: say so, as other strategies do.
        flagged = getattr(output, "nsfw_content_detected", None) or []
        if any(flagged):
            raise ContentPolicy(
                f"the pipeline's safety checker flagged {sum(map(bool, flagged))} of {len(flagged)} images"
            )
        return list(output.images)

    def _arguments(self, pipe: Any, plan: RenderPlan) -> dict[str, Any]:
        # One generator per image, seeded seed, seed+1, ...: image i is reproducible on its own.
        device = "cpu" if self.loaded.device == "mps" else self.loaded.device
        generators = [torch.Generator(device=device).manual_seed(plan.seed + i) for i in range(plan.num_images)]
        arguments: dict[str, Any] = {
            "prompt": plan.prompt,
            "num_inference_steps": plan.steps,
            "guidance_scale": plan.guidance_scale,
            "num_images_per_prompt": plan.num_images,
            "generator": generators,
            "output_type": "pil",
        }
        if plan.negative_prompt is not None:
            arguments["negative_prompt"] = plan.negative_prompt
        if plan.init_image is not None:
            arguments.update(image=plan.init_image, strength=plan.strength)
        if plan.init_image is None or "width" in inspect.signature(pipe.__call__).parameters:
            # SD's image-to-image takes its size from the image; FLUX's needs it said.
            arguments.update(width=plan.width, height=plan.height)
        if plan.control_image is not None:
            key = "control_image" if plan.init_image is not None else "image"
            arguments[key] = plan.control_image
            arguments["controlnet_conditioning_scale"] = self.controlnet_scale
        return arguments

    def _variant(self, kind: str) -> Any:
        """The pipeline for ``kind``, made once with ``from_pipe``: it shares the loaded weights."""
        if kind not in self._variants:
            from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

            base = self.loaded.pipe
            extra = {"controlnet": self.loaded.controlnet} if kind.startswith("depth_") else {}
            auto = AutoPipelineForImage2Image if kind.endswith("i2i") else AutoPipelineForText2Image
            variant = auto.from_pipe(base, **extra)
            variant.set_progress_bar_config(disable=True)
            self._variants[kind] = variant
        return self._variants[kind]

    def _set_loras(self, plan: RenderPlan) -> None:
        """Load each LoRA once (as an adapter on the shared denoiser), then weight this request's."""
        pipe = self.loaded.pipe
        for name, path, _ in plan.loras:
            if name not in self._adapters:
                try:
                    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
                except (OSError, ValueError, KeyError, RuntimeError) as exc:
                    if name in _adapter_names(pipe):  # a half-loaded adapter would poison later renders
                        pipe.delete_adapters([name])
                    raise BadLora(
                        f"{path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    ) from exc
                self._adapters.add(name)
        if not self._adapters:
            return
        if plan.loras:
            pipe.enable_lora()
            pipe.set_adapters([name for name, _, _ in plan.loras], adapter_weights=[w for _, _, w in plan.loras])
        else:
            pipe.disable_lora()

    def _release(self) -> None:
        """Give cached device memory back after every render (a stopped or failed one above all)."""
        if self.loaded.device == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        self._variants.clear()
        self.loaded.pipe = None
        self.loaded.controlnet = None
        gc.collect()
        self._release()


def _adapter_names(pipe: Any) -> set[str]:
    return {name for names in pipe.get_list_adapters().values() for name in names}
