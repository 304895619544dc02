"""Compress a prompt with a local LLM through Ollama's ``/api/generate`` (API_CONTRACTS.md §11).

Any failure (connection refused, a 404 for a model that is not pulled, an error line in the
middle of a stream, the deadline) raises ``CompressionFailed`` with a short reason; the
policy then applies its fallback.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from image_server.prompting.settings import OllamaConfig


class CompressionFailed(Exception):
    """Ollama gave no usable answer; ``str(exc)`` says why, for ``ImageReady.applied``."""


class OllamaCompressor:
    def __init__(self, config: OllamaConfig, client: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self._client = client or httpx.AsyncClient(base_url=config.url)
        self._own_client = client is None

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    async def compress(self, prompt: str, limit: int) -> str:
        config = self.config
        body: dict[str, Any] = {
            "model": config.model,
            "system": config.instructions.replace("{limit}", str(limit)),
            "prompt": prompt,
            "stream": config.stream,
            "keep_alive": config.keep_alive,
            "options": {"temperature": config.temperature},
        }
        try:
            async with asyncio.timeout(config.timeout_s):
                if config.stream:
                    text = await self._streamed(body)
                else:
                    response = await self._client.post("/api/generate", json=body)
                    text = _answer(response.status_code, _json(response.content)).get("response", "")
        except TimeoutError:
            raise CompressionFailed(f"ollama did not answer within {config.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise CompressionFailed(f"ollama unreachable ({type(exc).__name__})") from None
        return " ".join(str(text).split())

    async def _streamed(self, body: dict[str, Any]) -> str:
        parts: list[str] = []
        async with self._client.stream("POST", "/api/generate", json=body) as response:
            if response.status_code != 200:
                _answer(response.status_code, _json(await response.aread()))
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                chunk = _answer(200, _json(line.encode()))  # an error line can follow a 200
                parts.append(str(chunk.get("response", "")))
                if chunk.get("done"):
                    return "".join(parts)
        raise CompressionFailed("ollama's stream ended without a done line")


def _json(content: bytes) -> dict[str, Any]:
    try:
        data = json.loads(content)
    except ValueError:
        raise CompressionFailed("ollama answered with something that is not JSON") from None
    if not isinstance(data, dict):
        raise CompressionFailed("ollama answered with something that is not a JSON object")
    return data


def _answer(status: int, data: dict[str, Any]) -> dict[str, Any]:
    error = data.get("error")
    if status != 200 or error:
        raise CompressionFailed(f"ollama: {str(error or f'HTTP {status}')[:200]}")
    return data
