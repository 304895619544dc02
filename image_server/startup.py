"""Start-up checks: one-line refusals with distinct exit codes instead of tracebacks.

The codes (README.md, "Exit codes") let a supervisor or a script tell a typo in the config
from a port in use or a second service on the same state dir.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import zmq

from image_server.config import ServiceConfig
from image_server.errors import ConfigError, GeneratorUnavailable
from image_server.security import load_keypair, load_public_key
from image_server.statelock import StateDirLocked
from image_server.writable import writable_problem

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1  # a failure while running; for `health`: not ready
EXIT_CONFIG = 2  # invalid config file, environment variable or flag (argparse's usage errors too)
EXIT_GENERATOR = 3  # a configured generator cannot be loaded (its extra is not installed, or a preloaded model)
EXIT_ADDRESS = 4  # a socket or HTTP address is in use or cannot be bound
EXIT_DIRECTORY = 5  # output_dir or state_dir not writable
EXIT_KEYS = 6  # CURVE key files missing, unreadable or readable by others
EXIT_LOCKED = 7  # another service holds the state dir


class StartupError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def config_failure(exc: ConfigError) -> StartupError:
    """A config that did not load: a missing extra gets its own code."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, GeneratorUnavailable):
            return StartupError(str(exc), EXIT_GENERATOR)
        cause = cause.__cause__
    return StartupError(str(exc), EXIT_CONFIG)


def preflight(config: ServiceConfig) -> None:
    """Refuse (``StartupError``) what would fail later. (A generator whose strategy cannot be
    imported never gets here: loading the config refuses it, exit 3. Retired provider models
    are warned about by the manager as it opens, from ``GeneratorConfig.startup_warnings``.)"""
    folders = [("output_dir", config.output_dir)]
    if config.journal.enabled:
        folders.append(("state_dir", config.state_dir))
    for key, folder in folders:
        problem = writable_problem(Path(folder))
        if problem is not None:
            raise StartupError(f"{key}: {problem}", EXIT_DIRECTORY)
    security = config.security
    if security.curve:
        try:
            load_keypair(security.secret_key)
            if security.server_public_key is not None:
                load_public_key(security.server_public_key)
        except ConfigError as exc:
            raise StartupError(str(exc), EXIT_KEYS) from None
        if not security.authorized_keys.is_dir():
            raise StartupError(
                f"security.authorized_keys {security.authorized_keys} is not a directory "
                "(create it and copy the clients' .key files into it)",
                EXIT_KEYS,
            )


def startup_failure(exc: BaseException) -> StartupError | None:
    """The one-line refusal for an error raised while the service starts, if it is one."""
    if isinstance(exc, StartupError):
        return exc
    if isinstance(exc, StateDirLocked):
        return StartupError(exc.message, EXIT_LOCKED)
    if isinstance(exc, zmq.ZMQError) and exc.errno in (zmq.EADDRINUSE, zmq.EADDRNOTAVAIL, errno.EACCES):
        return StartupError(f"cannot bind a socket: {exc}", EXIT_ADDRESS)
    if isinstance(exc, OSError) and exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
        return StartupError(f"cannot bind the HTTP listener: {exc.strerror or exc}", EXIT_ADDRESS)
    if isinstance(exc, ConfigError):
        return config_failure(exc)
    if isinstance(exc, GeneratorUnavailable):  # a generator with preload = true whose model does not load
        return StartupError(exc.message, EXIT_GENERATOR)
    return None
