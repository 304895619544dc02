"""image_server: a ZeroMQ render microservice (RenderRequest in, ImageReady or RenderError out)."""

from __future__ import annotations

from image_server.client import MessageTooLarge, RenderClient, RenderFailed, RenderResult
from image_server.config import ServiceConfig, load_config
from image_server.service import ImageService

__all__ = [
    "ImageService",
    "MessageTooLarge",
    "RenderClient",
    "RenderFailed",
    "RenderResult",
    "ServiceConfig",
    "load_config",
]
