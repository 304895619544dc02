"""Provider models known to be retired or legacy: a warning at start-up, not a refusal
(the provider may still answer for a while, and the operator decides when to move)."""

from __future__ import annotations

from collections.abc import Mapping

from image_server.generators.base import GeneratorConfig

# strategy -> {model id: advice}. Config fields looked at: "model" and "endpoint".
RETIRED_MODELS: dict[str, dict[str, str]] = {
    "openai": {
        "dall-e-2": "a legacy model; use gpt-image-1 or newer",
        "dall-e-3": "a legacy model; use gpt-image-1 or newer",
    },
    "gemini": {
        "gemini-2.5-flash-image-preview": "the preview id was retired; use gemini-2.5-flash-image",
        "gemini-2.0-flash-preview-image-generation": "retired; use gemini-2.5-flash-image",
    },
}
MODEL_FIELDS = ("model", "endpoint")


def retired_model_warnings(generators: Mapping[str, GeneratorConfig]) -> list[str]:
    warnings = []
    for name, config in sorted(generators.items()):
        known = RETIRED_MODELS.get(config.strategy, {})
        for field in MODEL_FIELDS:
            value = getattr(config, field, None)
            if isinstance(value, str) and value in known:
                warnings.append(f"generator {name}: {field} {value!r} is {known[value]}")
    return warnings
