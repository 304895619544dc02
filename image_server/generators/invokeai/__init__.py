"""The invokeai strategy: SD1.5, SDXL and FLUX.1 graphs on an InvokeAI server's session queue."""

from image_server.generators.invokeai.config import InvokeAIConfig
from image_server.generators.invokeai.generator import InvokeAIGenerator

__all__ = ["InvokeAIConfig", "InvokeAIGenerator"]
