"""The runpod strategy: ComfyUI workflows on a RunPod serverless endpoint running worker-comfyui 5.x."""

from image_server.generators.runpod.config import RunPodConfig
from image_server.generators.runpod.generator import RunPodGenerator

__all__ = ["RunPodConfig", "RunPodGenerator"]
