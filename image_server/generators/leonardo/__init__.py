"""The leonardo strategy: Leonardo.ai REST API v1 (create a generation, poll it, download)."""

from image_server.generators.leonardo.config import LeonardoConfig
from image_server.generators.leonardo.generator import LeonardoGenerator

__all__ = ["LeonardoConfig", "LeonardoGenerator"]
