"""fal storage uploads for reference images (API_CONTRACTS.md section 1.5), to configured hosts.

A CDN token from ``rest_url`` (cached until it expires), then the bytes to ``cdn_url``; if the
CDN fails, fal's GCS path: ``rest_url`` hands out a signed upload URL and the file's URL.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime

import httpx

from image_server.errors import GenerationFailed
from image_server.generators.fal.queue import FalHTTP

logger = logging.getLogger(__name__)
TOKEN_MARGIN_S = 30.0  # refresh a little early: a token that expires mid-upload fails the upload


@dataclass(frozen=True)
class CDNToken:
    header: str  # "<token_type> <token>"
    expires: float  # time.time() seconds


class FalStorage(FalHTTP):
    """``client`` carries the fal key (for ``rest_url``); ``plain`` carries no credentials and takes
    the CDN upload (which has its own token) and the PUT to a signed GCS URL."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        plain: httpx.AsyncClient,
        *,
        rest_url: str,
        cdn_url: str,
        generator: str,
        secrets: tuple[str, ...],
    ) -> None:
        super().__init__(client, generator=generator, secrets=secrets)
        self.plain = plain
        self.rest_url = rest_url
        self.cdn_url = cdn_url
        self._token: CDNToken | None = None

    async def token(self) -> CDNToken:
        """A CDN upload token; also the health check (free, authenticated, no side effect)."""
        if self._token is not None and self._token.expires - TOKEN_MARGIN_S > time.time():
            return self._token
        url = f"{self.rest_url}/storage/auth/token"
        body = await self.call("POST", url, params={"storage_type": "fal-cdn-v3"}, json={})
        try:
            header = f"{body['token_type']} {body['token']}"
            expires = datetime.fromisoformat(body["expires_at"]).timestamp()
        except (KeyError, TypeError, ValueError):
            raise self.malformed("the storage token answer lacks token, token_type or expires_at") from None
        self._token = CDNToken(header, expires)
        return self._token

    async def upload(self, data: bytes, content_type: str, file_name: str) -> str:
        """The public URL of ``data`` on fal's storage."""
        try:
            return await self._upload_cdn(data, content_type, file_name)
        except GenerationFailed as exc:
            logger.warning("%s: fal CDN upload failed (%s); trying fal's GCS upload", self.generator, exc)
            return await self._upload_gcs(data, content_type, file_name)

    async def _upload_cdn(self, data: bytes, content_type: str, file_name: str) -> str:
        token = await self.token()
        headers = {"Authorization": token.header, "Content-Type": content_type, "X-Fal-File-Name": file_name}
        response = await self.plain.post(f"{self.cdn_url}/files/upload", content=data, headers=headers)
        self.raise_for_status(response)
        return self._url(self.json(response), "access_url")

    async def _upload_gcs(self, data: bytes, content_type: str, file_name: str) -> str:
        url = f"{self.rest_url}/storage/upload/initiate"
        body = await self.call(
            "POST",
            url,
            params={"storage_type": "gcs"},
            json={"file_name": file_name, "content_type": content_type},
        )
        upload_url, file_url = self._url(body, "upload_url"), self._url(body, "file_url")
        # A signed URL: it needs no credentials, so the fal key does not travel to the bucket.
        response = await self.plain.put(upload_url, content=data, headers={"Content-Type": content_type})
        self.raise_for_status(response)
        return file_url

    def _url(self, body: object, key: str) -> str:
        value = body.get(key) if isinstance(body, dict) else None
        if not isinstance(value, str) or not value.startswith(("http://", "https://")):
            raise self.malformed(f"the storage answer has no {key}")
        return value
