"""The console as the service runs it: built from config, on the service's own HTTP listener."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import zmq.asyncio
from aiohttp import web

from image_server.config import ServiceConfig
from image_server.console.console import Console
from image_server.console.routes import add_console_routes
from image_server.errors import ConfigError
from image_server.security import load_keypair
from image_server.sockets import is_loopback_endpoint


def console_token(config: ServiceConfig, environ: Mapping[str, str] = os.environ) -> str | None:
    """The token from ``console.token_env``; refuses to serve the console beyond loopback without one."""
    token = environ.get(config.console.token_env, "").strip() or None
    if token is None and not is_loopback_endpoint(f"tcp://{config.http.host}:{config.http.port}"):
        raise ConfigError(
            f"the console would be reachable beyond this machine (http.host {config.http.host}) "
            f"without a token: set one in the environment variable {config.console.token_env}"
        )
    return token


def build_console(
    config: ServiceConfig,
    endpoints: Mapping[str, str],
    context: zmq.asyncio.Context,
    environ: Mapping[str, str] = os.environ,
) -> tuple[Console, Callable[[web.Application], None]]:
    """The console (not yet started) and the function that mounts its routes on an app."""
    if "requests" not in endpoints or "events" not in endpoints:
        raise ConfigError("the console needs the service's sockets bound (it connects to them as a client)")
    token = console_token(config, environ)
    keys, server_key = None, None
    if config.security.curve and config.console.client_secret_key is not None:
        keys = load_keypair(config.console.client_secret_key)
        server_key = load_keypair(config.security.secret_key).public  # the service's own public half
    console = Console(
        endpoints["requests"],
        endpoints["events"],
        output_dir=config.output_dir,
        cache_dir=config.state_dir / "console-thumbs",
        context=context,
        recent=config.console.recent,
        status_interval_s=config.console.status_interval_s,
        curve_keys=keys,
        curve_server_key=server_key,
    )
    names = sorted(config.generators)

    def mount(app: web.Application) -> None:
        add_console_routes(app, console, token=token, generator_names=names)

    return console, mount
