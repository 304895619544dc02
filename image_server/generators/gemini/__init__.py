"""The gemini strategy: Google Gemini image models through ``generateContent``."""

from image_server.generators.gemini.config import GeminiConfig
from image_server.generators.gemini.generator import GeminiGenerator

__all__ = ["GeminiConfig", "GeminiGenerator"]
