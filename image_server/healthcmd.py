"""``image-server health``: exit 0 when the configured service is ready, 1 when not.

With ``[http] enabled`` it asks ``/readyz`` (the full readiness checks); otherwise it sends a
``StatusRequest`` over the service's bound ZMQ sockets and waits for the answer, which shows
that the service is up and reading requests. Either way within ``timeout`` seconds; with
``wait`` it keeps asking until the service is ready or the time is up (for start-up).
"""

from __future__ import annotations

import asyncio
import sys

import httpx

from image_server.client import RenderClient
from image_server.config import ServiceConfig
from image_server.startup import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK


def local_endpoint(bind: str) -> str:
    """Where a client on this machine reaches a socket bound at ``bind`` (``*`` -> loopback)."""
    return bind.replace("://*:", "://127.0.0.1:").replace("://0.0.0.0:", "://127.0.0.1:")


RETRY_INTERVAL_S = 0.5


async def health(config: ServiceConfig, *, timeout: float, wait: bool = False) -> int:
    if config.http.enabled:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            code, text = await _readyz(config, max(0.1, deadline - loop.time()))
            if code == EXIT_OK or not wait or loop.time() + RETRY_INTERVAL_S >= deadline:
                print(text, file=sys.stdout if code == EXIT_OK else sys.stderr)
                return code
            await asyncio.sleep(RETRY_INTERVAL_S)
    sockets = config.sockets
    if not (sockets.requests.bind and sockets.events.bind and sockets.requests.kind == "sub"):
        print("image-server: health over ZMQ needs bound sub/xpub sockets; enable [http] instead", file=sys.stderr)
        return EXIT_CONFIG
    requests, events = local_endpoint(sockets.requests.bind), local_endpoint(sockets.events.bind)
    try:
        async with RenderClient(requests, events) as client:
            status = await client.status(timeout=timeout)
    except TimeoutError:
        print(f"not ready: no ServiceStatus from {requests} within {timeout:g}s", file=sys.stderr)
        return EXIT_FAILURE
    print(f"ready: {status.service_id} {status.version}, {status.in_flight} in flight, {status.queued} queued")
    return EXIT_OK


async def _readyz(config: ServiceConfig, timeout: float) -> tuple[int, str]:
    host = config.http.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    url = f"http://[{host}]:{config.http.port}/readyz" if ":" in host else f"http://{host}:{config.http.port}/readyz"
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            response = await client.get(url)
    except httpx.HTTPError as exc:
        return EXIT_FAILURE, f"not ready: {url}: {exc or type(exc).__name__}"
    return (EXIT_OK if response.status_code == 200 else EXIT_FAILURE), response.text.strip()
