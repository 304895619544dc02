"""Cloudflare Workers AI strategy configuration."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from image_server.generators.base import GeneratorConfig


class CloudflareConfig(GeneratorConfig):
    """``[generators.<name>]`` with ``strategy = "cloudflare"``."""

    # Model knobs only; the manager builds an instance with them applied (see gemini.py on models).
    OVERRIDABLE: ClassVar[frozenset[str]] = frozenset({"steps"})

    strategy: Literal["cloudflare"] = "cloudflare"
    # Literal in the URL path: segments may not be "." or "..".
    model: str = Field(default="@cf/black-forest-labs/flux-1-schnell", pattern=r"^@[a-z0-9-]+(/\w[\w.-]*){2}$")
    account_id_env: str = "CLOUDFLARE_ACCOUNT_ID"
    api_token_env: str = "CLOUDFLARE_API_TOKEN"
    base_url: str = Field(default="https://api.cloudflare.com/client/v4", pattern=r"^https?://")
    # Steps sent when the request names none; requests above max_steps are clamped to it.
    steps: int = Field(default=4, ge=1, le=50)
    max_steps: int = Field(default=8, ge=1, le=50)
    max_prompt_chars: int = Field(default=2048, ge=1, le=100_000)
    # The model schema has no seed (and forbids extra properties); opt in if your model takes one.
    send_seed: bool = False
    request_timeout_s: float | None = Field(default=None, gt=0, le=3600)

    @model_validator(mode="after")
    def _steps_within_max(self) -> CloudflareConfig:
        if self.steps > self.max_steps:
            raise ValueError(f"steps {self.steps} is above max_steps {self.max_steps}")
        return self
