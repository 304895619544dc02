"""The kie strategy: Kie.ai's Seedream v4 text-to-image and edit through its task API."""

from image_server.generators.kie.config import KieConfig
from image_server.generators.kie.generator import KieGenerator

__all__ = ["KieConfig", "KieGenerator"]
