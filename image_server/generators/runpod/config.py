"""``[generators.<name>]`` with ``strategy = "runpod"``: an endpoint running worker-comfyui 5.x."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from image_server.generators.workflow import WorkflowGeneratorConfig

DEFAULT_BASE_URL = "https://api.runpod.ai/v2"
BASE_URL_ENV = "RUNPOD_ENDPOINT_BASE_URL"  # what runpod-python honours; used when base_url is unset


class RunPodConfig(WorkflowGeneratorConfig):
    strategy: Literal["runpod"] = "runpod"
    endpoint_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")
    api_key_env: str = "RUNPOD_API_KEY"
    base_url: str | None = Field(default=None, pattern=r"^https?://")
    # "run": submit then poll /status; "runsync": wait on the submit, polling if it comes back unfinished.
    mode: Literal["run", "runsync"] = "run"
    poll_interval_s: float = Field(default=1.0, gt=0, le=60)  # the first poll's wait
    poll_max_interval_s: float = Field(default=5.0, gt=0, le=300)
    poll_backoff: float = Field(default=1.5, ge=1.0, le=4.0)
    timeout_s: float = Field(default=600.0, gt=0, le=3600)
    request_timeout_s: float | None = Field(default=120.0, gt=0, le=3600)  # runsync holds the call open
    # RunPod refuses bodies over 10 MB (/run) or 20 MB (/runsync). Over it, references are shrunk
    # (re-encoded as JPEG, halved until it fits) if allowed, else the request is refused.
    max_payload_bytes: int = Field(default=10_000_000, ge=1024, le=20_000_000)
    shrink_references: bool = True
