"""``[generators.<name>]`` with ``strategy = "comfyui"``: a ComfyUI server and its workflows."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from image_server.generators.workflow import WorkflowGeneratorConfig


class ComfyUIConfig(WorkflowGeneratorConfig):
    strategy: Literal["comfyui"] = "comfyui"
    base_url: str = Field(default="http://127.0.0.1:8188", pattern=r"^https?://")
    timeout_s: float = Field(default=300.0, gt=0, le=3600)
    request_timeout_s: float | None = Field(default=30.0, gt=0, le=3600)  # each HTTP call
    # Follow the render on /ws (progress, the fastest end); False: poll /history only.
    websocket: bool = True
    poll_interval_s: float = Field(default=0.25, gt=0, le=60)  # /history polling when there is no websocket
    # A websocket silent this long about our prompt (a proxy that stopped passing frames, a
    # lost final event) is given up for /history polling, which cannot miss the end.
    events_quiet_s: float = Field(default=30.0, gt=0, le=3600)
    # References go to ComfyUI's input/<upload_subfolder>/<request id>-<nonce>/.
    upload_subfolder: str = Field(default="image_server", pattern=r"^[A-Za-z0-9._-]{1,64}$")
