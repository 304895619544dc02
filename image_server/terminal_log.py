"""One log line and one counter per terminal event, as the service ends a request."""

from __future__ import annotations

import logging
from collections import Counter

from schemas import BatchDone, ImageReady, RenderError

logger = logging.getLogger(__name__)


def note_terminal(event: ImageReady | RenderError | BatchDone, counters: Counter[str]) -> None:
    """Count ``event`` (completed, failed, batches) and log it."""
    rid = event.request_id
    if isinstance(event, BatchDone):
        counters["batches"] += 1
        logger.info("← %s batch: %d ok, %d failed", rid, event.succeeded, event.failed)
    elif isinstance(event, RenderError):
        counters["failed"] += 1
        logger.info(
            "! %s %s: %s",
            rid,
            event.code,
            event.message,
            extra={"request_id": rid, "generator": event.generator, "code": event.code},
        )
    else:
        counters["completed"] += 1
        logger.info(
            "← %s %s %.2fs",
            rid,
            event.generator,
            event.timings.total / 1000,
            extra={"request_id": rid, "generator": event.generator, "duration_ms": event.timings.total},
        )
