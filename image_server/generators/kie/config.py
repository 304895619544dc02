"""Kie.ai Seedream v4 configuration and the size presets it knows (API_CONTRACTS.md section 5)."""

from __future__ import annotations

from typing import ClassVar, Literal, get_args

from pydantic import Field, model_validator

from image_server.generators.base import GeneratorConfig

ImageSize = Literal[
    "square",
    "square_hd",
    "portrait_4_3",
    "portrait_3_2",
    "portrait_16_9",
    "landscape_4_3",
    "landscape_3_2",
    "landscape_16_9",
    "landscape_21_9",
]
IMAGE_SIZES: tuple[str, ...] = get_args(ImageSize)
ImageResolution = Literal["1K", "2K", "4K"]
# Kie's file API takes at most 10 MB per file and Seedream at most 10 image_urls.
MAX_REFERENCE_BYTES = 10 * 1024 * 1024
MAX_REFERENCES = 10
MODEL_PATTERN = r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$"


class KieConfig(GeneratorConfig):
    """``[generators.<name>]`` with ``strategy = "kie"``: Seedream v4 text-to-image and edit."""

    # Model knobs only; hosts, models and the key are fixed per configured generator name.
    OVERRIDABLE: ClassVar[frozenset[str]] = frozenset({"image_size", "image_resolution", "nsfw_checker"})

    strategy: Literal["kie"] = "kie"
    api_key_env: str = Field(default="KIE_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    base_url: str = Field(default="https://api.kie.ai", pattern=r"^https?://")
    # The file upload API lives on its own host (section 5, "Getting reference images to a URL").
    upload_base_url: str = Field(default="https://kieai.redpandaai.co", pattern=r"^https?://")
    text_model: str = Field(default="bytedance/seedream-v4-text-to-image", pattern=MODEL_PATTERN)
    edit_model: str = Field(default="bytedance/seedream-v4-edit", pattern=MODEL_PATTERN)
    # Used when a request gives no width/height; None leaves Kie's default (square_hd, 1K).
    image_size: ImageSize | None = None
    image_resolution: ImageResolution | None = None
    nsfw_checker: bool | None = None  # None: not sent (Kie's default)
    # Seedream makes several images only when the prompt asks for them: for num_images > 1 a
    # sentence saying how many is appended (ImageReady.prompt shows the prompt as sent).
    count_in_prompt: bool = True
    max_prompt_chars: int = Field(default=5000, ge=1, le=100_000)
    # How references reach Kie: "base64" (JSON) or "stream" (multipart, a third fewer bytes).
    upload: Literal["base64", "stream"] = "base64"
    upload_path: str = Field(default="image-server", pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
    # http(s) references are handed to Kie as they are (Kie fetches them: they must be public
    # JPEG/PNG/WebP); false uploads every reference.
    pass_through_urls: bool = True
    # recordInfo polling: starts at poll_interval_s, grows by poll_backoff up to poll_max_interval_s.
    poll_interval_s: float = Field(default=2.5, gt=0, le=60)
    poll_backoff: float = Field(default=1.5, ge=1.0, le=4.0)
    poll_max_interval_s: float = Field(default=15.0, gt=0, le=300)
    # Seedream usually takes 10-60 s; Kie advises giving up after 10-15 min. Kie has no cancel:
    # a task we stop waiting for still runs (and is billed).
    timeout_s: float = Field(default=300.0, gt=0, le=3600)
    request_timeout_s: float = Field(default=60.0, gt=0, le=600)  # each HTTP call

    @model_validator(mode="after")
    def _poll_bounds(self) -> KieConfig:
        if self.poll_interval_s > self.poll_max_interval_s:
            raise ValueError(f"poll_interval_s {self.poll_interval_s} is above poll_max_interval_s")
        return self
