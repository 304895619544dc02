"""Mock strategy configuration."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from image_server.generators.base import GeneratorConfig
from image_server.generators.mock.drawing import Style


class MockConfig(GeneratorConfig):
    """``[generators.<name>]`` with ``strategy = "mock"``."""

    OVERRIDABLE: ClassVar[frozenset[str]] = frozenset({"style", "delay_s", "fail_rate"})

    strategy: Literal["mock"] = "mock"
    style: Style = "simple"
    delay_s: float = Field(default=0.0, ge=0, le=600)
    fail_rate: float = Field(default=0.0, ge=0, le=1)
    # Serve the images in this folder (chosen by seed) instead of drawing new ones.
    image_dir: Path | None = None
