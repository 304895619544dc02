"""Which configured generators lack their optional extra (``uv sync --extra fal``).

A strategy's SDK is imported only when it is used, so a missing extra would otherwise show
up at the first request. The package metadata says what each extra installs; an extra named
after a strategy belongs to it. Checking by import (not by metadata) also catches a broken
install.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, packages_distributions, requires

from image_server.generators.base import GeneratorConfig

DISTRIBUTION = "image-server"
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*")


def extra_requirements() -> dict[str, list[str]]:
    """Extra name -> distribution names it installs, from the installed package's metadata."""
    try:
        lines = requires(DISTRIBUTION) or []
    except PackageNotFoundError:  # pragma: no cover - a bare source tree
        return {}
    extras: dict[str, list[str]] = {}
    for line in lines:
        marker = _EXTRA_MARKER.search(line)
        name = _NAME.match(line)
        if marker and name:
            extras.setdefault(marker.group(1), []).append(name.group(0))
    return extras


def _module_for(distribution: str) -> str:
    normalized = re.sub(r"[-_.]+", "-", distribution).lower()
    for module, owners in packages_distributions().items():
        if any(re.sub(r"[-_.]+", "-", owner).lower() == normalized for owner in owners):
            return module
    return normalized.replace("-", "_")


def missing_extras(generators: Mapping[str, GeneratorConfig]) -> list[str]:
    """One line per configured generator whose strategy's extra cannot be imported."""
    extras = extra_requirements()
    problems = []
    for name, config in sorted(generators.items()):
        for distribution in extras.get(config.strategy, []):
            module = _module_for(distribution)
            try:
                importlib.import_module(module)
            except ImportError as exc:
                problems.append(
                    f"generator {name} (strategy {config.strategy}) needs the '{config.strategy}' extra "
                    f"({exc}); install it: uv sync --extra {config.strategy} "
                    f"(or pip install 'image-server[{config.strategy}]')"
                )
                break
    return problems
