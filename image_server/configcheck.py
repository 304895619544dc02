"""``image-server config check``: the effective configuration, secrets masked, and the
generators with their capabilities. Loading the config already validated the file and the
environment; a failure never reaches here (it exits 2 or 3 with one line)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from rich.console import Console

from image_server.config import ServiceConfig
from image_server.errors import ImageServerError
from image_server.generators.registry import create_generator

SECRET_KEY = re.compile(r"(secret|password|token|api_key|apikey|authorization)$", re.IGNORECASE)


def masked(value: Any, key: str = "") -> Any:
    """``value`` with secret-looking fields replaced; ``*_env`` fields say whether the variable is set."""
    if isinstance(value, dict):
        return {k: masked(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v, key) for v in value]
    if key.endswith("_env") and isinstance(value, str):
        return f"{value} ({'set' if os.environ.get(value) else 'not set'})"
    if SECRET_KEY.search(key) and value:
        return "***"
    return value


def config_check(config: ServiceConfig) -> int:
    console = Console()
    console.print_json(json.dumps(masked(config.model_dump(mode="json", serialize_as_any=True))))
    console.print("generators:", style="bold")
    problems = 0
    for name, generator_config in sorted(config.generators.items()):
        try:
            caps = create_generator(name, generator_config).capabilities
        except ImageServerError as exc:
            console.print(f"  {name} ({generator_config.strategy}): unavailable: {exc.message}", markup=False)
            problems += 1
            continue
        features = [
            label
            for label, on in (
                ("text-to-image", caps.text_to_image),
                ("image-to-image", caps.image_to_image),
                ("depth map", caps.depth_map),
            )
            if on
        ]
        refs = f", up to {caps.max_reference_images} reference image(s)" if caps.max_reference_images else ""
        default = " [default]" if name == config.default_generator else ""
        console.print(f"  {name} ({generator_config.strategy}){default}: {', '.join(features)}{refs}", markup=False)
    return 1 if problems else 0
