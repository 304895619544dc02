"""The installed package's version (``image-server --version``, Heartbeat, ServiceStatus)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("image-server")
except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
    VERSION = "0+unknown"
