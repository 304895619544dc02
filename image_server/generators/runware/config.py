"""Runware strategy configuration."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from image_server.generators.base import GeneratorConfig

# AIR model identifiers: ``source:id@version`` (``runware:101@1``, ``civitai:58390@62833``).
AIR_PATTERN = r"^[A-Za-z0-9_.-]+:[A-Za-z0-9_.-]+@[A-Za-z0-9_.-]+$"

# Task keys the strategy fills itself; ``arguments`` may not set them.
MANAGED_ARGUMENTS = frozenset(
    {
        "taskType",
        "taskUUID",
        "model",
        "positivePrompt",
        "negativePrompt",
        "width",
        "height",
        "steps",
        "CFGScale",
        "seed",
        "numberResults",
        "outputType",
        "outputFormat",
        "outputQuality",
        "seedImage",
        "strength",
        "referenceImages",
        "lora",
        "deliveryMethod",
        "checkNSFW",
    }
)


class RunwareConfig(GeneratorConfig):
    """``[generators.<name>]`` with ``strategy = "runware"``: one model, by AIR id."""

    OVERRIDABLE: ClassVar[frozenset[str]] = frozenset({"steps", "cfg_scale", "strength", "scheduler", "output_quality"})

    strategy: Literal["runware"] = "runware"
    api_key_env: str = Field(default="RUNWARE_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    base_url: str = Field(default="https://api.runware.ai/v1", pattern=r"^https?://")
    model: str = Field(default="runware:101@1", pattern=AIR_PATTERN)
    # Sizes are snapped to this multiple (64 for SD-family models; some models take 16 or 32).
    size_multiple: int = Field(default=64, ge=1, le=256)
    min_size: int = Field(default=128, ge=64, le=2048)
    max_size: int = Field(default=2048, ge=64, le=8192)
    width: int = Field(default=1024, ge=64, le=8192)  # when a request gives no width
    height: int = Field(default=1024, ge=64, le=8192)
    steps: int | None = Field(default=None, ge=1, le=100)  # None: the model's default
    cfg_scale: float | None = Field(default=None, ge=0, le=50)
    strength: float | None = Field(default=None, ge=0, le=1)  # img2img: 1 ignores the seed image
    scheduler: str | None = Field(default=None, max_length=100)
    max_images: int = Field(default=4, ge=1, le=20)
    # How the images come back: raw base64 (no second round trip), a data URI, or a URL to download.
    # Delivery ``url`` always asks for URLs and hands them on.
    output_type: Literal["base64Data", "dataURI", "URL"] = "base64Data"
    output_quality: int | None = Field(default=None, ge=20, le=99)
    # References: the first as ``seedImage`` (image-to-image with strength), or all as
    # ``referenceImages`` (models such as FLUX Kontext); sent inline or through ``imageUpload``.
    reference_mode: Literal["seed_image", "reference_images"] = "seed_image"
    max_reference_images: int = Field(default=4, ge=1, le=10)
    upload: Literal["image_upload", "inline"] = "image_upload"
    check_nsfw: bool = False  # ask Runware to flag NSFW results (``NSFWContent``)
    refuse_nsfw: bool = True  # a flagged result ends in RenderError(content_policy)
    loras: bool = True  # request LoRAs (AIR ids) go into the task's ``lora`` list
    delivery_method: Literal["sync", "async"] = "sync"  # async: ack at once, then poll getResponse
    poll_interval_s: float = Field(default=1.0, gt=0, le=30)
    poll_backoff: float = Field(default=1.5, ge=1.0, le=4.0)
    poll_max_interval_s: float = Field(default=5.0, gt=0, le=60)
    poll_failures_tolerated: int = Field(default=3, ge=0, le=20)  # retryable getResponse failures in a row
    arguments: dict[str, Any] = Field(default_factory=dict)  # extra task fields (clipSkip, vae, ...)
    # A sync call holds the connection while the image renders.
    request_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    health_check: Literal["dry_run", "key"] = "dry_run"

    @model_validator(mode="after")
    def _coherent(self) -> RunwareConfig:
        managed = sorted(MANAGED_ARGUMENTS.intersection(self.arguments))
        if managed:
            raise ValueError(f"arguments may not set {', '.join(managed)}: use the request or the dedicated fields")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size {self.min_size} is above max_size {self.max_size}")
        return self
