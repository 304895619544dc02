"""The comfyui strategy: user-exported workflows on a ComfyUI server, with LoRA stacks."""

from image_server.generators.comfyui.config import ComfyUIConfig
from image_server.generators.comfyui.generator import ComfyUIGenerator

__all__ = ["ComfyUIConfig", "ComfyUIGenerator"]
