"""Who sent a message: the key requests are scoped to (cancel, clear_queue, channel, caps).

With CURVE on, a client is its authenticated public key: the ZAP handler (pyzmq's
authenticator) reports it as the message's ``User-Id`` property, and no client can claim
another's. Without CURVE there is nothing to authenticate, and the request's own
``reply_to`` stands in: advisory only, since any peer may write any ``reply_to``
(README.md and SECURITY.md say so).
"""

from __future__ import annotations

from dataclasses import dataclass

import zmq

ANONYMOUS = ""


def curve_user_id(frame: zmq.Frame) -> str | None:
    """The ZAP user id of a message received with ``copy=False`` (``None`` without ZAP)."""
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:  # EINVAL: the connection was not authenticated
        return None
    return str(value) if value else None


def owner_key(user_id: str | None, reply_to: str | None) -> str:
    """The key a request is scoped to: ``curve:<z85 key>``, else ``reply_to:<id>``."""
    if user_id:
        return f"curve:{user_id}"
    return f"reply_to:{reply_to}" if reply_to else ANONYMOUS


@dataclass(frozen=True)
class Ticket:
    """One message's claim on a request id: who sent it and where its events go."""

    request_id: str
    owner: str
    reply_to: str | None = None
