"""CURVE encryption and client authentication for the service's sockets (pyzmq zmq.auth).

CURVE without a running ZAP handler accepts any client key (measured on libzmq 4.3.5), so
refusing unknown clients takes all of: ``curve_server``, a ZAP domain, ``ZAP_ENFORCE_DOMAIN``
and an authenticator holding the allow-list of client public keys.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from image_server.config import SecurityConfig
from image_server.errors import ConfigError

ZAP_DOMAIN = "image-server"


@dataclass(frozen=True)
class KeyPair:
    public: bytes
    secret: bytes


def generate_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``<name>.key`` (public, 0644) and ``<name>.key_secret`` (0600) into ``directory``
    (created 0700). zmq.auth writes secret files 0644 by itself: we tighten them."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return Path(public), Path(secret)


def load_keypair(path: Path) -> KeyPair:
    """A secret key file (it holds both halves); refuses files others can read."""
    try:
        mode = path.stat().st_mode
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load CURVE key file {path}: {exc}") from exc
    if secret is None:
        raise ConfigError(f"{path} holds no secret key (use the .key_secret file)")
    if mode & 0o077:
        raise ConfigError(f"{path} is readable by others (mode {mode & 0o777:o}); chmod 600 it")
    return KeyPair(public, secret)


def load_public_key(path: Path) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load CURVE public key {path}: {exc}") from exc
    return public


def make_server(socket: zmq.Socket[bytes] | zmq.asyncio.Socket, keys: KeyPair) -> None:
    """Make ``socket`` a CURVE server whose clients must pass the ZAP allow-list."""
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True
    socket.zap_domain = ZAP_DOMAIN.encode()
    socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def make_client(socket: zmq.Socket[bytes] | zmq.asyncio.Socket, keys: KeyPair, server_public: bytes) -> None:
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_serverkey = server_public


def start_authenticator(context: zmq.asyncio.Context, authorized_dir: Path) -> AsyncioAuthenticator:
    """A running ZAP handler that admits only the public keys in ``authorized_dir``."""
    if not authorized_dir.is_dir():
        raise ConfigError(f"security.authorized_keys {authorized_dir} is not a directory")
    auth = AsyncioAuthenticator(context)
    auth.start()
    auth.configure_curve(domain=ZAP_DOMAIN, location=str(authorized_dir))
    return auth


def prepare_ipc_endpoint(endpoint: str) -> None:
    """ipc:// sockets live in a private directory: create it 0700, refuse a shared one."""
    if not endpoint.startswith("ipc://"):
        return
    parent = Path(endpoint[len("ipc://") :]).parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True)
        os.chmod(parent, 0o700)  # mkdir's mode is masked by the umask
        return
    mode = parent.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(
            f"ipc endpoint {endpoint}: its directory {parent} has mode {mode:o}; "
            "use a directory of mode 0700 so other local users cannot connect"
        )


def curve_setup(
    security: SecurityConfig, context: zmq.asyncio.Context, stack: contextlib.AsyncExitStack
) -> tuple[KeyPair | None, bytes | None]:
    """Keys and a running ZAP authenticator (stopped by ``stack``) when CURVE is on."""
    if not security.curve:
        return None, None
    keys = load_keypair(security.secret_key)
    server_key = load_public_key(security.server_public_key) if security.server_public_key else None
    # The authenticator must be up before the sockets bind, or early clients go unchecked.
    authenticator = start_authenticator(context, security.authorized_keys)
    stack.callback(authenticator.stop)
    return keys, server_key
