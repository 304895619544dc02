"""Command line: argparse -> logging -> config -> the command. No logic lives here."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import logging.config
import logging.handlers
import os
import queue
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from image_server.config import ServiceConfig, load_config
from image_server.errors import ConfigError

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


def _setup_logging(level: str) -> None:
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "plain": {"format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s", "datefmt": "%H:%M:%S"}
            },
            "handlers": {
                "stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}
            },
            "root": {"handlers": ["stderr"], "level": level.upper()},
            # httpx logs every request URL at INFO; some URLs carry account ids.
            "loggers": {"httpx": {"level": "WARNING"}, "httpcore": {"level": "WARNING"}},
        }
    )
    _write_logs_on_a_thread()


def _write_logs_on_a_thread() -> None:
    """Writing a log line is file I/O; the event loop only queues the record, a listener
    thread writes it (logging.handlers' QueueHandler/QueueListener)."""
    root = logging.getLogger()
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, *root.handlers, respect_handler_level=True)
    root.handlers = [logging.handlers.QueueHandler(records)]
    listener.start()
    atexit.register(listener.stop)  # flushes what is queued before the process exits


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="image-server", description="ZeroMQ render microservice.")
    parser.add_argument("--config", help="config file (default: $IMAGE_SERVER_CONFIG or ./config.toml)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--output-dir", help="where images are written")
    parser.add_argument("--state-dir", help="where the journal lives")
    parser.add_argument("--default-generator", help="generator for requests that name none")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the service")
    serve.add_argument("--requests-bind", help="bind the requests socket here (e.g. tcp://127.0.0.1:5555)")
    serve.add_argument("--events-bind", help="bind the events socket here (e.g. tcp://127.0.0.1:5556)")

    render = commands.add_parser("render", help="render one image in-process and print its path")
    render.add_argument("prompt")
    render.add_argument("--generator")
    render.add_argument("--width", type=int)
    render.add_argument("--height", type=int)
    render.add_argument("--seed", type=int)
    render.add_argument("--steps", type=int)
    render.add_argument("--num-images", type=int, default=1)
    render.add_argument("--reference", action="append", default=[], help="a reference image file or URI (repeatable)")
    render.add_argument("--output-format", choices=["png", "jpeg", "webp"], default="png")
    render.add_argument("--project")

    generators = commands.add_parser("generators", help="list configured generators")
    generators.add_argument("--check", action="store_true", help="also make a cheap call to each backend")

    commands.add_parser("demo", help="start the service on loopback, render through real sockets, show timings")

    jobs = commands.add_parser("jobs", help="list recent journal entries")
    jobs.add_argument("--limit", type=int, default=30)

    keys = commands.add_parser("keys", help="CURVE key pairs")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    generate = keys_commands.add_parser("generate", help="write NAME.key (public) and NAME.key_secret (mode 0600)")
    generate.add_argument("--dir", default="keys", help="folder for the key files (created 0700)")
    generate.add_argument("--name", default="server", help="file name stem, e.g. server or a client's name")

    broker = commands.add_parser("broker", help="one address for clients in front of N workers")
    broker.add_argument("--clients-requests", default="tcp://127.0.0.1:5555", help="clients send requests here")
    broker.add_argument("--clients-events", default="tcp://127.0.0.1:5556", help="clients subscribe here")
    broker.add_argument("--workers-requests", default="tcp://127.0.0.1:5557", help="workers' PULL sockets connect here")
    broker.add_argument("--workers-events", default="tcp://127.0.0.1:5558", help="workers' event sockets connect here")
    broker.add_argument("--clients-kind", choices=["pub", "push"], default="pub", help="what clients send with")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level if args.command in ("serve", "broker") else "warning")
    if args.command in ("broker", "keys"):
        from image_server import commands

        return commands.broker(args) if args.command == "broker" else commands.generate_keys(args)
    try:
        config = load_config(_config_path(args.config), overrides=_flag_overrides(args))
    except ConfigError as exc:
        print(f"image-server: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_dispatch(args, config))


async def _dispatch(args: argparse.Namespace, config: ServiceConfig) -> int:
    from image_server import commands

    if args.command == "serve":
        return await commands.serve(config)
    if args.command == "render":
        return await commands.render_once(config, args)
    if args.command == "generators":
        return await commands.list_generators(config, check=args.check)
    if args.command == "demo":
        return await commands.demo(config)
    if args.command == "jobs":
        return commands.jobs(config, limit=args.limit)
    raise AssertionError(args.command)  # pragma: no cover - argparse enforces the choices
