"""Turn any exception into the ``RenderError`` a client sees (one place, stable codes)."""

from __future__ import annotations

import logging

from image_server.errors import ImageServerError
from schemas import RenderError, RenderRequest

logger = logging.getLogger(__name__)


def error_event(
    exc: BaseException, request: RenderRequest | None, *, request_id: str | None = None, generator: str | None = None
) -> RenderError:
    """A ``RenderError`` for ``exc``. Unexpected exceptions become ``internal`` with no detail
    on the wire (it may hold anything); the service logs them with a traceback."""
    rid = request.request_id if request is not None else (request_id or "")
    metadata = request.metadata if request is not None else {}
    if isinstance(exc, ImageServerError):
        return RenderError(
            request_id=rid,
            code=exc.code,
            message=exc.message,
            retryable=exc.retryable,
            generator=exc.generator or generator,
            attempts=exc.attempts,
            metadata=metadata,
        )
    return RenderError(
        request_id=rid,
        code="internal",
        message=f"internal error ({type(exc).__name__}); see the service log",
        retryable=False,
        generator=generator,
        metadata=metadata,
    )
