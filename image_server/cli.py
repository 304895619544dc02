"""Command line: argparse -> logging -> config -> the command. No logic lives here."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from image_server.config import ServiceConfig, load_config
from image_server.errors import ConfigError
from image_server.logsetup import setup_logging
from image_server.startup import StartupError, config_failure
from image_server.version import VERSION

DEFAULT_CONFIG = Path("config.toml")


def _config_path(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    env = os.environ.get("IMAGE_SERVER_CONFIG")
    if env:
        return Path(env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line flags, the top of the precedence order."""
    overrides: dict[str, Any] = {}
    sockets: dict[str, Any] = {}
    if getattr(args, "requests_bind", None):
        sockets["requests"] = {"bind": args.requests_bind, "connect": []}
    if getattr(args, "events_bind", None):
        sockets["events"] = {"bind": args.events_bind, "connect": []}
    if sockets:
        overrides["sockets"] = sockets
    for key in ("output_dir", "state_dir", "default_generator"):
        value = getattr(args, key, None)
        if value:
            overrides[key] = value
    return overrides


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """Options that work before or after the subcommand. After it, they default to
    SUPPRESS so that they do not overwrite what was given before it."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--config", default=default(None), help="config file (default: $IMAGE_SERVER_CONFIG or ./config.toml)"
    )
    parser.add_argument(
        "--log-level",
        default=default(None),
        choices=["debug", "info", "warning", "error"],
        help="log level (default: [log] level in the config, info)",
    )
    parser.add_argument(
        "--log-format", default=default(None), choices=["text", "json"], help="text lines or one JSON object a line"
    )
    parser.add_argument("--log-file", default=default(None), help="also log to this file, rotated (see [log])")
    parser.add_argument("--output-dir", default=default(None), help="where images are written")
    parser.add_argument("--state-dir", default=default(None), help="where the journal and its lock live")
    parser.add_argument("--default-generator", default=default(None), help="generator for requests that name none")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="image-server", description="ZeroMQ render microservice.")
    parser.add_argument("--version", action="version", version=f"image-server {VERSION}")
    _global_options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, defaults=False)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", parents=[common], help="run the service (with [cluster]: a gateway and a worker in one process)"
    )
    gateway = commands.add_parser(
        "gateway", parents=[common], help="distributed mode: the ZMQ front door and event relay (renders nothing)"
    )
    for command in (serve, gateway):
        command.add_argument("--requests-bind", help="bind the requests socket here (e.g. tcp://127.0.0.1:5555)")
        command.add_argument("--events-bind", help="bind the events socket here (e.g. tcp://127.0.0.1:5556)")
    worker = commands.add_parser(
        "worker", parents=[common], help="distributed mode: render requests from NATS JetStream (no ZMQ sockets)"
    )
    worker.add_argument("--worker-id", help="this worker's name in status (default: service_id-host-pid)")

    render = commands.add_parser("render", parents=[common], help="render one image in-process and print its path")
    render.add_argument("prompt", help="what to draw")
    render.add_argument("--generator", help="a configured generator (default: default_generator)")
    render.add_argument("--width", type=int, help="pixels")
    render.add_argument("--height", type=int, help="pixels")
    render.add_argument("--seed", type=int, help="for a reproducible image, where the generator takes one")
    render.add_argument("--steps", type=int, help="inference steps, where the generator takes them")
    render.add_argument("--num-images", type=int, default=1, help="how many images (default 1)")
    render.add_argument("--reference", action="append", default=[], help="a reference image file or URI (repeatable)")
    render.add_argument("--output-format", choices=["png", "jpeg", "webp"], default="png", help="image format")
    render.add_argument("--project", help="output subfolder (default: default_project)")

    generators = commands.add_parser("generators", parents=[common], help="list configured generators")
    generators.add_argument("--check", action="store_true", help="also make a cheap call to each backend")

    commands.add_parser(
        "demo", parents=[common], help="start the service on loopback, render through real sockets, show timings"
    )

    jobs = commands.add_parser(
        "jobs", parents=[common], help="list recent journal entries (with [cluster]: workers and queues)"
    )
    jobs.add_argument("--limit", type=int, default=30, help="how many entries, newest first")

    health = commands.add_parser(
        "health", parents=[common], help="exit 0 if the service is ready, 1 if not (for container health checks)"
    )
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    health.add_argument("--wait", action="store_true", help="keep asking until ready or --timeout (for start-up)")

    config = commands.add_parser("config", parents=[common], help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    config_commands.add_parser(
        "check", parents=[common], help="validate config and environment, print the effective config (secrets masked)"
    )

    keys = commands.add_parser("keys", parents=[common], help="CURVE key pairs")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    generate = keys_commands.add_parser("generate", help="write NAME.key (public) and NAME.key_secret (mode 0600)")
    generate.add_argument("--dir", default="keys", help="folder for the key files (created 0700)")
    generate.add_argument("--name", default="server", help="file name stem, e.g. server or a client's name")

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "keys":
        setup_logging(args.log_level or "info", fmt=args.log_format or "text")
        from image_server import commands

        return commands.generate_keys(args)
    try:
        config = load_config(_config_path(args.config), overrides=_flag_overrides(args))
    except ConfigError as exc:
        failure = config_failure(exc)
        print(f"image-server: {failure.message}", file=sys.stderr)
        return failure.exit_code
    log = config.log
    quiet = args.command not in ("serve", "gateway", "worker")  # one-shot commands print results, not log lines
    setup_logging(
        args.log_level or ("warning" if quiet else log.level),
        fmt=args.log_format or log.format,
        file=Path(args.log_file) if args.log_file else log.file,
        max_bytes=log.max_bytes,
        backups=log.backup_count,
    )
    try:
        return asyncio.run(_dispatch(args, config))
    except StartupError as exc:
        print(f"image-server: {exc.message}", file=sys.stderr)
        return exc.exit_code


async def _dispatch(args: argparse.Namespace, config: ServiceConfig) -> int:
    from image_server import commands

    if args.command in ("serve", "gateway", "worker"):
        return await commands.serve(config, role=args.command, worker_id=getattr(args, "worker_id", None))
    if args.command == "render":
        return await commands.render_once(config, args)
    if args.command == "generators":
        return await commands.list_generators(config, check=args.check)
    if args.command == "demo":
        return await commands.demo(config)
    if args.command == "jobs":
        if config.cluster.enabled:
            return await commands.cluster_jobs(config)
        return commands.jobs(config, limit=args.limit)
    if args.command == "health":
        from image_server.healthcmd import health

        return await health(config, timeout=args.timeout, wait=args.wait)
    if args.command == "config":
        from image_server.configcheck import config_check

        return config_check(config)
    raise AssertionError(args.command)  # pragma: no cover - argparse enforces the choices
