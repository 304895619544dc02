"""Create the service's ZMQ sockets from config: bind or connect, kinds, limits."""

from __future__ import annotations

import ipaddress
import logging
from urllib.parse import urlsplit

import zmq
import zmq.asyncio

from image_server.config import SocketConfig

logger = logging.getLogger(__name__)

_KINDS = {"sub": zmq.SUB, "pull": zmq.PULL, "pub": zmq.PUB, "xpub": zmq.XPUB}


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


def open_socket(context: zmq.asyncio.Context, config: SocketConfig, *, role: str) -> zmq.asyncio.Socket:
    """A socket of ``config.kind``, bound or connected; bind errors name the address."""
    socket = context.socket(_KINDS[config.kind])
    socket.setsockopt(zmq.LINGER, 0)
    if config.kind in ("pub", "xpub"):
        socket.setsockopt(zmq.SNDHWM, config.high_water_mark)
    else:
        socket.setsockopt(zmq.RCVHWM, config.high_water_mark)
    if config.kind == "xpub":
        # Every subscription reaches us (not only the first per topic), so each new client
        # can be greeted with a Heartbeat at once.
        socket.setsockopt(zmq.XPUB_VERBOSE, 1)
    if config.kind == "sub":
        socket.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        if config.bind:
            if not is_loopback_endpoint(config.bind):
                logger.warning("%s socket binds %s, which is reachable beyond this machine", role, config.bind)
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
