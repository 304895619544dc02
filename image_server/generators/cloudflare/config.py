"""Cloudflare Workers AI strategy configuration."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from image_server.generators.base import GeneratorConfig
from image_server.generators.cloudflare.models import GENERIC, FamilyName, ModelFamily, family_of


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
    # How requests are built: by the model table (models.py) unless set, for a model it lacks.
    family: FamilyName | None = None
    # Steps sent when the request names none, and the cap above which requests are clamped;
    # None: the family's (flux 4 of 8, Stable Diffusion 20 of 20).
    steps: int | None = Field(default=None, ge=1, le=50)
    max_steps: int | None = Field(default=None, ge=1, le=50)
    max_prompt_chars: int = Field(default=2048, ge=1, le=100_000)
    # For the generic family only (a model the table does not know): send the request's seed.
    send_seed: bool = False
    request_timeout_s: float | None = Field(default=None, gt=0, le=3600)

    @property
    def model_family(self) -> ModelFamily:
        return family_of(self.model, self.family)

    @property
    def step_limit(self) -> int:
        return self.max_steps or self.model_family.max_steps

    @property
    def default_steps(self) -> int:
        return self.steps or min(self.model_family.default_steps, self.step_limit)

    @model_validator(mode="after")
    def _steps_within_max(self) -> CloudflareConfig:
        family = self.model_family
        if self.max_steps is not None and family is not GENERIC and self.max_steps > family.max_steps:
            raise ValueError(f"max_steps {self.max_steps} is above the model's maximum of {family.max_steps}")
        if self.steps is not None and self.steps > self.step_limit:
            raise ValueError(f"steps {self.steps} is above max_steps {self.step_limit}")
        return self
