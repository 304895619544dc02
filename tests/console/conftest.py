"""Console fixtures: a running service, its console on a real HTTP listener, and a headless Chromium."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from image_server.console import Console
from image_server.service import ImageService

GENERATORS = {
    "mock": {"strategy": "mock"},
    "slow": {"strategy": "mock", "delay_s": 30.0},
    "broken": {"strategy": "mock", "fail_rate": 1.0, "retries": 0},
}

ARTIFACTS = Path(os.environ.get("CONSOLE_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts" / "console"))
INSTALL_HINT = (
    "the console's browser tests need Debian's Chromium: `sudo apt-get install chromium` "
    "(or set CHROMIUM_PATH to a Chromium binary); .ci/run installs it"
)


@dataclass
class RunningConsole:
    service: ImageService
    console: Console
    url: str


def chromium_path() -> str | None:
    return os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def chromium() -> str:
    path = chromium_path()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(INSTALL_HINT)  # CI installs it: its absence there is a failure
        pytest.skip(INSTALL_HINT)
    return path


@pytest.fixture
async def console_factory(
    service_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Any]]:
    """``async with console_factory(token=None, **config) as running:`` a service with its HTTP
    listener on an ephemeral loopback port and the console on it, as a user configures it."""

    @asynccontextmanager
    async def make(*, token: str | None = None, **overrides: Any) -> AsyncIterator[RunningConsole]:
        overrides.setdefault("generators", GENERATORS)
        overrides.setdefault("http", {"enabled": True, "port": 0})
        overrides.setdefault("console", {"enabled": True, "status_interval_s": 0.5, "token_env": "TEST_CONSOLE_TOKEN"})
        if token is None:
            monkeypatch.delenv("TEST_CONSOLE_TOKEN", raising=False)
        else:
            monkeypatch.setenv("TEST_CONSOLE_TOKEN", token)
        async with service_factory(**overrides) as service:
            assert service.console is not None
            yield RunningConsole(service, service.console, service.endpoints["http"])

    yield make


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()


def artifact(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name
