"""HTTPGenerator: the open/close lifecycle every HTTP API strategy shares.

One ``httpx.AsyncClient`` per generator, created by ``open()`` after the strategy has read
its credentials, closed by ``aclose()``. Credentials go on each API call, never on the
client, so downloading a result from another host never carries them.
"""

from __future__ import annotations

import httpx

from image_server.generators.base import Generator


class HTTPGenerator(Generator):
    """Base of strategies that call one HTTP API. The config needs ``base_url``,
    ``request_timeout_s`` (or None for ``timeout_s``)."""

    _client: httpx.AsyncClient | None = None

    def read_credentials(self) -> None:
        """Read keys from ``self.environ``; raise ``GeneratorUnavailable`` if one is unset."""

    async def open(self) -> None:
        if self._client is not None:
            return
        self.read_credentials()
        seconds = getattr(self.config, "request_timeout_s", None) or self.config.timeout_s
        timeout = httpx.Timeout(seconds, connect=min(10.0, seconds))
        self._client = httpx.AsyncClient(base_url=getattr(self.config, "base_url", ""), timeout=timeout)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def require_client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError(f"generator {self.name!r} is not open; use 'async with generator:' or call open() first")
        return self._client
