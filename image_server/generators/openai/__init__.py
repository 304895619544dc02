"""The openai strategy: OpenAI Images (gpt-image models, dall-e-3) over plain httpx."""

from image_server.generators.openai.config import OpenAIConfig
from image_server.generators.openai.generator import OpenAIGenerator

__all__ = ["OpenAIConfig", "OpenAIGenerator"]
