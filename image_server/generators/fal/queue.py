"""fal's queue and run HTTP APIs (API_CONTRACTS.md section 1.3), spoken with our own httpx client.

fal-client builds these URLs from module globals read at import and retries 408/409/429 up to
ten times on its own, blind to ``Retry-After``. Here every call is made once, to the hosts the
generator's config names; retrying is the job of ``image_server.resilience``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from image_server.errors import GenerationFailed
from image_server.generators.fal.errors import MAX_DETAIL_CHARS, error_for_fal_http
from image_server.generators.http import scrub

State = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
STATES: frozenset[str] = frozenset({"IN_QUEUE", "IN_PROGRESS", "COMPLETED"})


@dataclass(frozen=True)
class QueuedRequest:
    """What a submit returns; status, result and cancel follow these URLs verbatim, as fal-client does."""

    request_id: str
    response_url: str
    status_url: str
    cancel_url: str


@dataclass(frozen=True)
class QueueStatus:
    state: State
    queue_position: int | None = None
    logs: list[str] = field(default_factory=list)  # the messages of fal's log items, oldest first


class FalHTTP:
    """One generator's calls to fal. ``client`` carries ``Authorization: Key ...``; ``secrets``
    are scrubbed from every message built from a response."""

    def __init__(self, client: httpx.AsyncClient, *, generator: str, secrets: tuple[str, ...]) -> None:
        self.client = client
        self.generator = generator
        self.secrets = secrets

    async def call(self, method: str, url: str, **kwargs: Any) -> Any:
        """One request; a failure status raises our error, a 2xx returns the parsed JSON body."""
        response = await self.client.request(method, url, **kwargs)
        self.raise_for_status(response)
        return self.json(response)

    def raise_for_status(self, response: httpx.Response) -> None:
        if response.is_success:
            return
        detail: Any = response.text
        error_type = None
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            detail = body.get("detail", response.text)
            error_type = body.get("error_type")
        error_type = error_type if isinstance(error_type, str) else response.headers.get("x-fal-error-type")
        raise error_for_fal_http(
            response.status_code,
            detail,
            error_type,
            response.headers,
            generator=self.generator,
            secrets=self.secrets,
        )

    def json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise self.malformed(f"the body is not JSON: {response.text[:200]!r}") from None

    def malformed(self, reason: str) -> GenerationFailed:
        message = scrub(f"{self.generator}: fal returned a malformed response: {reason}", *self.secrets)
        return GenerationFailed(message[:MAX_DETAIL_CHARS], generator=self.generator)


class FalQueue(FalHTTP):
    """Submit, status, result, cancel on ``queue_url``; a synchronous run on ``run_url``."""

    def __init__(
        self, client: httpx.AsyncClient, *, queue_url: str, run_url: str, generator: str, secrets: tuple[str, ...]
    ) -> None:
        super().__init__(client, generator=generator, secrets=secrets)
        self.queue_url = queue_url
        self.run_url = run_url

    async def submit(
        self, endpoint: str, arguments: Mapping[str, Any], *, start_timeout: float | None
    ) -> QueuedRequest:
        # X-Fal-Request-Timeout makes fal drop the request if it is still queued when we give up.
        headers = {"X-Fal-Request-Timeout": str(start_timeout)} if start_timeout is not None else {}
        body = await self.call("POST", f"{self.queue_url}/{endpoint}", json=arguments, headers=headers)
        if not isinstance(body, dict):
            raise self.malformed("the submit answer is not an object")
        values = [body.get(key) for key in ("request_id", "response_url", "status_url", "cancel_url")]
        urls = [value for value in values if isinstance(value, str) and value]
        if len(urls) != len(values):
            raise self.malformed("the submit answer lacks request_id, response_url, status_url or cancel_url")
        return QueuedRequest(*urls)

    async def status(self, request: QueuedRequest, *, logs: bool) -> QueueStatus:
        body = await self.call("GET", request.status_url, params={"logs": "true" if logs else "false"})
        state = body.get("status") if isinstance(body, dict) else None
        if state not in STATES:
            raise self.malformed(f"unknown queue status {str(state)[:40]!r}")
        position = body.get("queue_position")
        return QueueStatus(
            state=state,
            queue_position=position if isinstance(position, int) and not isinstance(position, bool) else None,
            logs=_log_messages(body.get("logs")),
        )

    async def result(self, request: QueuedRequest) -> Any:
        return await self.call("GET", request.response_url)

    async def cancel(self, request: QueuedRequest) -> None:
        self.raise_for_status(await self.client.request("PUT", request.cancel_url))

    async def run(self, endpoint: str, arguments: Mapping[str, Any]) -> Any:
        return await self.call("POST", f"{self.run_url}/{endpoint}", json=arguments)


def _log_messages(logs: Any) -> list[str]:
    if not isinstance(logs, list):
        return []
    return [str(item["message"]) for item in logs if isinstance(item, dict) and item.get("message")]
