"""Leonardo strategy configuration and the limits of the v1 ``POST /generations`` API."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

from pydantic import Field, model_validator

from image_server.generators.base import GeneratorConfig

# ``presetStyle`` values (SDK enum SdGenerationStyle). Without alchemy only LEONARDO and NONE apply.
PresetStyle = Literal[
    "ANIME", "BOKEH", "CINEMATIC", "CINEMATIC_CLOSEUP", "CREATIVE", "DYNAMIC", "ENVIRONMENT", "FASHION",
    "FILM", "FOOD", "GENERAL", "HDR", "ILLUSTRATION", "LEONARDO", "LONG_EXPOSURE", "MACRO", "MINIMALISTIC",
    "MONOCHROME", "MOODY", "NONE", "NEUTRAL", "PHOTOGRAPHY", "PORTRAIT", "RAYTRACED", "RENDER_3D", "RETRO",
    "SKETCH_BW", "SKETCH_COLOR", "STOCK_PHOTO", "VIBRANT", "UNPROCESSED",
]  # fmt: skip
PRESET_STYLES: frozenset[str] = frozenset(get_args(PresetStyle))

# The API's documented bounds (API_CONTRACTS.md section 6 and the SDK's field docs).
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 32, 1536, 8
MAX_IMAGES, MAX_IMAGES_LARGE, LARGE_SIDE = 8, 4, 768  # over 768 px on a side: at most 4 images
STEPS_RANGE = (10, 60)
GUIDANCE_RANGE = (1, 20)  # an integer
INIT_STRENGTH_RANGE = (0.1, 0.9)
MAX_SEED = 9_999_999_998  # 2147483637 for Flux models: set max_seed for those
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"

# Body keys the strategy fills itself; ``arguments`` may not set them.
MANAGED_ARGUMENTS = frozenset(
    {
        "prompt",
        "negative_prompt",
        "modelId",
        "width",
        "height",
        "num_images",
        "num_inference_steps",
        "guidance_scale",
        "seed",
        "presetStyle",
        "alchemy",
        "public",
        "init_image_id",
        "init_generation_image_id",
        "init_strength",
        "elements",
    }
)


class LeonardoConfig(GeneratorConfig):
    """``[generators.<name>]`` with ``strategy = "leonardo"``."""

    OVERRIDABLE: ClassVar[frozenset[str]] = frozenset(
        {"preset_style", "alchemy", "num_inference_steps", "guidance_scale", "init_strength"}
    )

    strategy: Literal["leonardo"] = "leonardo"
    api_key_env: str = Field(default="LEONARDO_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    base_url: str = Field(default="https://cloud.leonardo.ai/api/rest/v1", pattern=r"^https?://")
    # The official SDK's default model; None sends no modelId (Leonardo then picks by sd_version).
    model_id: str | None = Field(default="b24e16ff-06e3-43eb-8d33-4416c2d75876", pattern=UUID_PATTERN)
    preset_style: PresetStyle | None = None  # a request's ``style`` naming a preset wins
    alchemy: bool | None = None
    public: bool = False  # true shows the images in Leonardo's community feed
    # Defaults when a request gives no width/height (None: Leonardo's own default).
    width: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE)
    height: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE)
    num_inference_steps: int | None = Field(default=None, ge=STEPS_RANGE[0], le=STEPS_RANGE[1])
    guidance_scale: int | None = Field(default=None, ge=GUIDANCE_RANGE[0], le=GUIDANCE_RANGE[1])
    # How closely an image-to-image result follows the init image; a request's ``strength`` s
    # becomes 1 - s (ours: 1 ignores the reference; Leonardo's: 0.9 keeps it most).
    init_strength: float | None = Field(default=None, ge=INIT_STRENGTH_RANGE[0], le=INIT_STRENGTH_RANGE[1])
    max_seed: int = Field(default=MAX_SEED, ge=1, le=MAX_SEED)
    # A generated image flagged ``nsfw`` ends the request in RenderError(content_policy).
    refuse_nsfw: bool = True
    # Request LoRAs become Leonardo Elements (``elements: [{akUUID, weight}]``); names must be element ids.
    elements: bool = True
    arguments: dict[str, Any] = Field(default_factory=dict)  # extra body fields (photoReal, contrast, ...)
    poll_interval_s: float = Field(default=1.0, gt=0, le=30)  # first wait; grows by poll_backoff
    poll_backoff: float = Field(default=1.5, ge=1.0, le=4.0)
    poll_max_interval_s: float = Field(default=5.0, gt=0, le=60)
    # Retryable failures of status polls in a row that are waited out (the generation runs on,
    # and is paid for, whatever happens to one poll); one more ends the render.
    poll_failures_tolerated: int = Field(default=3, ge=0, le=20)
    # Remove the uploaded init image once the generation is done; delete a generation we abandon.
    delete_init_images: bool = True
    delete_cancelled: bool = True
    cleanup_timeout_s: float = Field(default=5.0, gt=0, le=60)
    request_timeout_s: float = Field(default=30.0, gt=0, le=600)

    @model_validator(mode="after")
    def _arguments_not_managed(self) -> LeonardoConfig:
        managed = sorted(MANAGED_ARGUMENTS.intersection(self.arguments))
        if managed:
            raise ValueError(f"arguments may not set {', '.join(managed)}: use the request or the dedicated fields")
        return self
