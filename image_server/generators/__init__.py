"""Generator plug-ins: the base interface and the strategy registry."""

from __future__ import annotations

from image_server.generators.base import (
    Capabilities,
    GeneratedImage,
    GenerationResult,
    Generator,
    GeneratorConfig,
    HealthReport,
    ReferenceImage,
    RenderJob,
    check_request,
)
from image_server.generators.registry import (
    create_generator,
    get_generator_class,
    register_generator,
    reset_registry,
    strategies,
    validate_generator_config,
)

__all__ = [
    "Capabilities",
    "GeneratedImage",
    "GenerationResult",
    "Generator",
    "GeneratorConfig",
    "HealthReport",
    "ReferenceImage",
    "RenderJob",
    "check_request",
    "create_generator",
    "get_generator_class",
    "register_generator",
    "strategies",
    "reset_registry",
    "validate_generator_config",
]
