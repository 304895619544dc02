"""Create the service's ZMQ sockets from config: bind or connect, kinds, limits."""

from __future__ import annotations

import ipaddress
import logging
from urllib.parse import urlsplit

import zmq
import zmq.asyncio

from image_server.config import SocketConfig
from image_server.errors import ConfigError
from image_server.security import KeyPair, make_client, make_server, prepare_ipc_endpoint

logger = logging.getLogger(__name__)

_KINDS = {"sub": zmq.SUB, "pull": zmq.PULL, "pub": zmq.PUB, "xpub": zmq.XPUB, "push": zmq.PUSH}


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address or 'localhost'."""
    if not endpoint.startswith("tcp://"):
        return True
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name or a host name: reachable from elsewhere


def open_socket(
    context: zmq.asyncio.Context,
    config: SocketConfig,
    *,
    role: str,
    curve: KeyPair | None = None,
    curve_server_key: bytes | None = None,
    max_message_bytes: int | None = None,
) -> zmq.asyncio.Socket:
    """A socket of ``config.kind``, bound or connected; bind errors name the address.

    With ``curve`` keys a bound socket is a CURVE server (clients must be on the ZAP
    allow-list); a connecting one is a CURVE client of ``curve_server_key``.
    """
    socket = context.socket(_KINDS[config.kind])
    socket.setsockopt(zmq.LINGER, 0)
    if config.kind in ("pub", "xpub", "push"):
        socket.setsockopt(zmq.SNDHWM, config.high_water_mark)
    else:
        socket.setsockopt(zmq.RCVHWM, config.high_water_mark)
    if config.kind == "xpub":
        # Every subscription reaches us (not only the first per topic), so each new client
        # can be greeted with a Heartbeat at once.
        socket.setsockopt(zmq.XPUB_VERBOSE, 1)
    if config.kind == "sub":
        socket.setsockopt(zmq.SUBSCRIBE, b"")
    if max_message_bytes is not None:
        # Before bind: a listener copies the options it has then, so a cap set later is ignored.
        socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    if curve is not None:
        if config.bind:
            make_server(socket, curve)
        elif curve_server_key is None:
            socket.close(linger=0)
            raise ConfigError(f"sockets.{role} connects with CURVE on: set security.server_public_key")
        else:
            make_client(socket, curve, curve_server_key)
    try:
        if config.bind:
            prepare_ipc_endpoint(config.bind)
            if not is_loopback_endpoint(config.bind):
                if curve is None:
                    logger.warning(
                        "SECURITY: the %s socket binds %s, reachable beyond this machine, WITHOUT CURVE: anyone "
                        "who can reach it can %s. Set [security] curve = true (see SECURITY.md).",
                        role,
                        config.bind,
                        "send requests" if role == "requests" else "read every event",
                    )
                else:
                    logger.info("%s socket binds %s with CURVE", role, config.bind)
            socket.bind(config.bind)
        for endpoint in config.connect:
            socket.connect(endpoint)
    except zmq.ZMQError:
        socket.close(linger=0)
        raise
    return socket


def bound_endpoint(socket: zmq.asyncio.Socket) -> str:
    """The concrete endpoint (with the real port after binding to port 0 or '*')."""
    endpoint = socket.getsockopt(zmq.LAST_ENDPOINT)
    return endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)
