"""The fal strategy: fal.ai's queue API through fal-client (imported only when a fal generator opens)."""

from image_server.generators.fal.config import FalConfig
from image_server.generators.fal.generator import FalGenerator

__all__ = ["FalConfig", "FalGenerator"]
