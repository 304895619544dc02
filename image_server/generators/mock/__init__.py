"""The mock strategy: deterministic local images, no network, no model."""

from image_server.generators.mock.config import MockConfig
from image_server.generators.mock.generator import MockGenerator

__all__ = ["MockConfig", "MockGenerator"]
