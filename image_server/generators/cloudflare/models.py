"""What each Workers AI image model takes (API_CONTRACTS.md section 4 and Cloudflare's model
schemas), so a request is built per model family and ``applied``/``ignored`` tell the truth.

FLUX.1 schnell takes ``prompt``, ``steps`` (max 8) and ``seed``. The Stable Diffusion family
(SDXL base, SDXL lightning, SD 1.5 img2img) takes ``num_steps`` (max 20), ``width``/``height``
(256..2048), ``seed``, ``negative_prompt``, ``guidance`` and, for img2img, ``image_b64`` with
``strength``; it answers with PNG bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FamilyName = Literal["flux", "stable_diffusion", "stable_diffusion_img2img", "generic"]


@dataclass(frozen=True)
class ModelFamily:
    steps_field: str
    default_steps: int
    max_steps: int
    # Request parameters the model takes, by our name (guidance_scale is sent as "guidance").
    parameters: frozenset[str]
    sizes: bool = False  # takes width/height
    min_size: int = 64
    max_size: int = 4096
    text_to_image: bool = True
    image_to_image: bool = False


FLUX = ModelFamily("steps", 4, 8, frozenset({"steps", "seed"}))
_SD_PARAMETERS = frozenset({"steps", "seed", "negative_prompt", "guidance_scale"})
STABLE_DIFFUSION = ModelFamily("num_steps", 20, 20, _SD_PARAMETERS, sizes=True, min_size=256, max_size=2048)
STABLE_DIFFUSION_IMG2IMG = ModelFamily(
    "num_steps",
    20,
    20,
    _SD_PARAMETERS | {"strength"},
    sizes=True,
    min_size=256,
    max_size=2048,
    text_to_image=False,
    image_to_image=True,
)
# A model this table does not know: prompt and steps only (seed with ``send_seed``).
GENERIC = ModelFamily("steps", 4, 8, frozenset({"steps"}))

FAMILIES: dict[FamilyName, ModelFamily] = {
    "flux": FLUX,
    "stable_diffusion": STABLE_DIFFUSION,
    "stable_diffusion_img2img": STABLE_DIFFUSION_IMG2IMG,
    "generic": GENERIC,
}
KNOWN_MODELS: dict[str, FamilyName] = {
    "@cf/black-forest-labs/flux-1-schnell": "flux",
    "@cf/stabilityai/stable-diffusion-xl-base-1.0": "stable_diffusion",
    "@cf/bytedance/stable-diffusion-xl-lightning": "stable_diffusion",
    "@cf/runwayml/stable-diffusion-v1-5-img2img": "stable_diffusion_img2img",
}


def family_of(model: str, configured: FamilyName | None = None) -> ModelFamily:
    """The configured family, else the known model's, else ``GENERIC``."""
    name = configured or KNOWN_MODELS.get(model, "generic")
    return FAMILIES[name]
