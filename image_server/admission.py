"""What journaling a request came to: admitted, refused (with the terminal event to send), or
a repeat of a finished request (answered with its stored event)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable

from image_server.active import Active, Admission
from image_server.errors import ImageServerError, Overloaded
from image_server.journal import QuotaExceeded, Recorded, Recording
from image_server.outcomes import error_event
from schemas import RenderError

logger = logging.getLogger(__name__)


async def admission_of(active: Active, recording: Awaitable[Recorded | None]) -> Admission:
    """Wait for ``recording`` (the journal's answer for ``active``; None without a journal)."""
    request = active.request
    try:
        recorded = await recording
    except ImageServerError as exc:
        return Admission(refusal=error_event(exc, request, generator=active.generator))
    except QuotaExceeded as exc:
        logger.warning("! %s refused: %s", request.request_id, exc)
        return Admission(refusal=error_event(Overloaded(f"not accepted: {exc}"), request))
    except Exception:
        # Not journaled means not accepted: say so rather than strand the request.
        logger.exception("! %s: the journal could not record it", request.request_id)
        failure = RenderError(
            request_id=request.request_id,
            code="internal",
            message="the service could not journal the request; try again",
            retryable=True,
            metadata=request.metadata,
        )
        return Admission(refusal=failure)
    if recorded is not None and recorded.state is Recording.FINISHED:
        return Admission(repeat=recorded)
    return Admission()
