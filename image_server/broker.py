"""``image-server broker``: one address for clients while workers come and go.

Requests: clients PUSH (or PUB) to the broker's frontend; the broker PUSHes them to
whichever workers have connected their PULL request sockets (round robin, skipping
workers that are gone). Events: workers connect their PUB/XPUB sockets to the broker's
XSUB; clients subscribe at its XPUB. Both are ``zmq.proxy``; nothing is parsed here.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Literal

import zmq

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerEndpoints:
    clients_requests: str = "tcp://127.0.0.1:5555"  # clients send requests here
    clients_events: str = "tcp://127.0.0.1:5556"  # clients subscribe here
    workers_requests: str = "tcp://127.0.0.1:5557"  # workers' PULL sockets connect here
    workers_events: str = "tcp://127.0.0.1:5558"  # workers' PUB/XPUB sockets connect here
    clients_kind: Literal["push", "pub"] = "pub"


class Broker:
    """Two steerable proxies on threads; ``start()``, then ``stop()`` from any thread."""

    def __init__(self, endpoints: BrokerEndpoints, *, context: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        self.endpoints = endpoints
        self.context = context or zmq.Context()
        self._threads: list[threading.Thread] = []
        self._controls: list[zmq.Socket[bytes]] = []
        self.bound: dict[str, str] = {}

    def start(self) -> None:
        e = self.endpoints
        front_kind = zmq.PULL if e.clients_kind == "push" else zmq.SUB
        requests_in = self._bind(front_kind, e.clients_requests, "clients_requests")
        if front_kind == zmq.SUB:
            requests_in.setsockopt(zmq.SUBSCRIBE, b"")
        requests_out = self._bind(zmq.PUSH, e.workers_requests, "workers_requests")
        events_in = self._bind(zmq.XSUB, e.workers_events, "workers_events")
        events_out = self._bind(zmq.XPUB, e.clients_events, "clients_events")
        # Pass every subscription upstream, so each worker greets each new client at once.
        events_out.setsockopt(zmq.XPUB_VERBOSE, 1)
        self._spawn("requests", requests_in, requests_out)
        self._spawn("events", events_out, events_in)
        logger.info("broker: %s", ", ".join(f"{k} {v}" for k, v in self.bound.items()))

    def _bind(self, kind: int, endpoint: str, role: str) -> zmq.Socket[bytes]:
        socket = self.context.socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(endpoint)
        self.bound[role] = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        return socket

    def _spawn(self, name: str, frontend: zmq.Socket[bytes], backend: zmq.Socket[bytes]) -> None:
        address = f"inproc://broker-control-{name}-{id(self)}"
        control_in = self.context.socket(zmq.PAIR)
        control_in.bind(address)
        control_out = self.context.socket(zmq.PAIR)
        control_out.connect(address)
        self._controls.append(control_out)

        def run() -> None:
            try:
                # TERMINATE works in libzmq 4.3.5 (PAUSE/RESUME are swapped; we use neither).
                zmq.proxy_steerable(frontend, backend, None, control_in)
            except zmq.ContextTerminated:
                pass
            finally:
                for socket in (frontend, backend, control_in):
                    socket.close(linger=0)

        thread = threading.Thread(target=run, name=f"broker-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        for control in self._controls:
            control.send(b"TERMINATE")
        for thread in self._threads:
            thread.join(timeout=5)
        for control in self._controls:
            control.close(linger=0)
        self._controls.clear()
        self._threads.clear()
