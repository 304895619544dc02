"""/healthz, /readyz and /metrics on the service's HTTP server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from aiohttp import web

from image_server.config import HttpConfig
from image_server.health import Check, ServiceProbe
from image_server.metrics import CONTENT_TYPE
from image_server.web.server import HttpServer


@asynccontextmanager
async def health_server(
    config: HttpConfig, probe: ServiceProbe, *, extra_routes: Callable[[web.Application], None] | None = None
) -> AsyncIterator[HttpServer]:
    """The service's HTTP server with the health routes (and ``extra_routes``, e.g. the
    console's), listening until the block ends."""
    server = HttpServer(config.host, config.port)
    add_health_routes(server.app, probe)
    if extra_routes is not None:
        extra_routes(server.app)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def add_health_routes(app: web.Application, probe: ServiceProbe) -> None:
    async def healthz(request: web.Request) -> web.Response:
        return _answer([probe.liveness()])

    async def readyz(request: web.Request) -> web.Response:
        return _answer(await probe.readiness())

    async def metrics(request: web.Request) -> web.Response:
        body = await probe.refresh_metrics()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


def _answer(checks: list[Check]) -> web.Response:
    """200 when every check passed, else 503; the body lists each check and why it failed."""
    ok = all(check.ok for check in checks)
    body = {"status": "ok" if ok else "fail", "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks}}
    return web.Response(
        status=200 if ok else 503, text=json.dumps(body, indent=1) + "\n", content_type="application/json"
    )
