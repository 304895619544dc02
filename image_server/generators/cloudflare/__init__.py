"""The cloudflare strategy: Cloudflare Workers AI text-to-image over REST."""

from image_server.generators.cloudflare.config import CloudflareConfig
from image_server.generators.cloudflare.generator import CloudflareGenerator

__all__ = ["CloudflareConfig", "CloudflareGenerator"]
