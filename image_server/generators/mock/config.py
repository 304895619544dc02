"""Mock strategy configuration."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from image_server.generators.base import GeneratorConfig
from image_server.generators.mock.drawing import Style


class MockConfig(GeneratorConfig):
    """``[generators.<name>]`` with ``strategy = "mock"``."""

    OVERRIDABLE: ClassVar[frozenset[str]] = frozenset({"style", "delay_s", "fail_rate", "tail_rate", "tail_delay_s"})

    strategy: Literal["mock"] = "mock"
    style: Style = "simple"
    delay_s: float = Field(default=0.0, ge=0, le=600)
    fail_rate: float = Field(default=0.0, ge=0, le=1)
    # A long tail, as paid providers have: this share of attempts waits tail_delay_s more
    # (drawn per request, generator and attempt, so a run can be repeated).
    tail_rate: float = Field(default=0.0, ge=0, le=1)
    tail_delay_s: float = Field(default=0.0, ge=0, le=600)
    # A provider-like prompt limit (to try the prompt policy without a paid provider).
    max_prompt_chars: int | None = Field(default=None, ge=1)
    # Serve the images in this folder (chosen by seed) instead of drawing new ones.
    image_dir: Path | None = None
    # Drawing processes for JPEG and WebP pictures (drawing and encoding hold the GIL, so
    # threads cannot use a second core): 0 draws in threads; unset, one per core (at most 4)
    # on a machine with 2 cores or more, none on one core. Started by the first render that
    # needs them, ended with the generator.
    processes: int | None = Field(default=None, ge=0, le=32)
    # Smaller pictures stay in a thread: sending them to a process costs more than it saves.
    process_min_pixels: int = Field(default=512 * 512, ge=0)

    def drawing_processes(self) -> int:
        """How many drawing processes ``processes`` means on this machine."""
        if self.processes is not None:
            return self.processes
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return min(cores, 4) if cores >= 2 else 0
