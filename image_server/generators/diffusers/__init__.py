"""The diffusers strategy: Hugging Face diffusers pipelines in the service's own process.

Importing this package imports no torch: it only checks that the ``local`` extra is installed,
so a config naming the strategy without it fails at once with an error naming the extra.
torch and diffusers are imported when a generator of this strategy opens.
"""

from image_server.generators.diffusers.extra import require_local_extra

require_local_extra()

from image_server.generators.diffusers.config import DiffusersConfig  # noqa: E402
from image_server.generators.diffusers.generator import DiffusersGenerator  # noqa: E402

__all__ = ["DiffusersConfig", "DiffusersGenerator"]
