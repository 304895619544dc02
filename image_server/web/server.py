"""``HttpServer``: an aiohttp application on one TCP listener, started and stopped with the service."""

from __future__ import annotations

import logging

from aiohttp import web

from image_server.sockets import is_loopback_endpoint

logger = logging.getLogger(__name__)


class HttpServer:
    """Routes go on ``app`` (``app.router.add_get(...)``) before ``start()``; ``port`` is the
    real one after start (bind to port 0 in tests)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.requested_port = port
        self.app = web.Application()
        self._runner: web.AppRunner | None = None
        self.port = port

    async def start(self) -> None:
        # handle_signals=False: the service owns SIGTERM/SIGINT. No access log: a scrape every
        # few seconds would drown the service's own lines.
        runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.requested_port, reuse_address=False)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        address = runner.addresses[0]
        self.port = int(address[1])
        if not is_loopback_endpoint(f"tcp://{self.host}:{self.port}"):
            logger.warning("the HTTP listener binds %s, reachable beyond this machine", self.host)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
