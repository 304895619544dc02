"""InvokeAI strategy configuration (providers/API_CONTRACTS.md section 9)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from image_server.generators.base import GeneratorConfig

# InvokeAI's BaseModelType values this strategy builds graphs for ("sd-2" uses the SD1 graph).
Base = Literal["sd-1", "sd-2", "sdxl", "flux"]


class InvokeAIConfig(GeneratorConfig):
    """``[generators.<name>]`` with ``strategy = "invokeai"``.

    ``model`` (and the FLUX components) are InvokeAI model names or keys, looked up through
    ``/api/v2/models/``. Unset render settings fall back to the model's own default settings
    in InvokeAI, then to the family's usual values.
    """

    # A local server costs nothing per model: a request may pick another installed model or
    # change the render knobs; the server, the queue and credentials stay as configured.
    OVERRIDABLE: ClassVar[frozenset[str]] = frozenset(
        {"model", "base", "scheduler", "steps", "cfg_scale", "guidance", "width", "height", "board"}
    )

    strategy: Literal["invokeai"] = "invokeai"
    base_url: str = Field(default="http://127.0.0.1:9090", pattern=r"^https?://")
    queue_id: str = Field(default="default", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    model: str = Field(min_length=1, max_length=512)
    # Only needed when two installed models share the name across families.
    base: Base | None = None
    # FLUX.1 needs a T5 encoder, a CLIP-L embed model and a FLUX VAE: unset picks the first installed.
    t5_encoder: str | None = Field(default=None, max_length=512)
    clip_embed: str | None = Field(default=None, max_length=512)
    vae: str | None = Field(default=None, max_length=512)
    scheduler: str | None = Field(default=None, pattern=r"^[a-z0-9_]{1,64}$")
    steps: int | None = Field(default=None, ge=1, le=200)
    cfg_scale: float | None = Field(default=None, ge=0, le=50)  # SD1.5 / SDXL
    guidance: float | None = Field(default=None, ge=0, le=50)  # FLUX distilled guidance
    width: int | None = Field(default=None, ge=64, le=4096)
    height: int | None = Field(default=None, ge=64, le=4096)
    # Outputs go to a board named after the request's ``project``; ``board`` is used when a
    # request names none (unset: InvokeAI's "Uncategorized"). ``project_boards = false`` always
    # uses ``board``.
    board: str | None = Field(default=None, min_length=1, max_length=300)
    project_boards: bool = True
    # Optional credentials (a reverse proxy's token, or InvokeAI multi-user mode): the value of
    # ``token_env`` is sent as ``<auth_header>: <auth_scheme> <token>``; the empty scheme sends it bare.
    token_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    auth_header: str = Field(default="Authorization", pattern=r"^[A-Za-z0-9-]{1,64}$")
    auth_scheme: str = Field(default="Bearer", pattern=r"^[A-Za-z0-9-]{0,32}$")
    # Queue item polling: starts at poll_interval_s, grows by poll_backoff up to poll_max_interval_s.
    poll_interval_s: float = Field(default=0.25, gt=0, le=30)
    poll_backoff: float = Field(default=1.5, ge=1.0, le=4.0)
    poll_max_interval_s: float = Field(default=1.0, gt=0, le=60)
    cancel_timeout_s: float = Field(default=5.0, gt=0, le=60)
    request_timeout_s: float | None = Field(default=30.0, gt=0, le=3600)
    max_images: int = Field(default=4, ge=1, le=8)
    # How long the model and board lookups are trusted before being asked again.
    cache_ttl_s: float = Field(default=300.0, ge=0, le=86400)

    @model_validator(mode="after")
    def _poll_bounds(self) -> InvokeAIConfig:
        if self.poll_interval_s > self.poll_max_interval_s:
            raise ValueError(f"poll_interval_s {self.poll_interval_s} is above poll_max_interval_s")
        return self
