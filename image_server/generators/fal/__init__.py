"""The fal strategy: fal.ai's queue and run HTTP APIs, spoken with httpx."""

from image_server.generators.fal.config import FalConfig
from image_server.generators.fal.generator import FalGenerator

__all__ = ["FalConfig", "FalGenerator"]
