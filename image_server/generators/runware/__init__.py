"""The runware strategy: Runware's task-array REST API (``imageInference``, ``imageUpload``)."""

from image_server.generators.runware.config import RunwareConfig
from image_server.generators.runware.generator import RunwareGenerator

__all__ = ["RunwareConfig", "RunwareGenerator"]
