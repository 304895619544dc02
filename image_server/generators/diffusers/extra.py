"""Is the ``local`` extra installed? Answered without importing torch (a multi-second import)."""

from __future__ import annotations

from importlib.util import find_spec

EXTRA = "local"
PACKAGES = ("torch", "diffusers", "transformers", "safetensors")


def missing_packages() -> list[str]:
    missing = []
    for name in PACKAGES:
        try:
            found = find_spec(name) is not None
        except (ImportError, ValueError):  # a finder that refuses the name, or a half-imported module
            found = False
        if not found:
            missing.append(name)
    return missing


def require_local_extra() -> None:
    """Raise ImportError naming the extra when any of its packages is missing."""
    missing = missing_packages()
    if missing:
        raise ImportError(f"{', '.join(missing)} not installed (the {EXTRA!r} extra)")
