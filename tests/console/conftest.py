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
import zmq.asyncio
from aiohttp import web

from image_server.console import Console, add_console_routes
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
    service_factory: Callable[..., Any], context: zmq.asyncio.Context, tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    """``async with console_factory(token=None, **config) as running:`` service + console + HTTP."""

    @asynccontextmanager
    async def make(*, token: str | None = None, **overrides: Any) -> AsyncIterator[RunningConsole]:
        overrides.setdefault("generators", GENERATORS)
        async with service_factory(**overrides) as service:
            console = Console(
                service.endpoints["requests"],
                service.endpoints["events"],
                output_dir=service.config.output_dir,
                cache_dir=service.config.state_dir / "console-thumbs",
                context=context,
                status_interval_s=0.5,
            )
            app = web.Application()
            add_console_routes(app, console, token=token, generator_names=sorted(overrides["generators"]))
            runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            await console.start()
            try:
                yield RunningConsole(service, console, f"http://127.0.0.1:{port}")
            finally:
                await console.aclose()  # ends the pages' event streams, which the runner waits for
                await runner.cleanup()

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
