"""Per-request timeline inside the service, for ``bench_timeline.py``.

``serve_wrapper.py`` calls ``install`` when ``BENCH_TIMELINE=<path>`` is set: a few stable
points of the request path are wrapped to record ``time.perf_counter()`` (CLOCK_MONOTONIC,
the same clock in every process on the machine) at entry (``name>``) and exit (``name<``),
per request id; the stamps are written to ``<path>`` as JSON when the process exits.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

STAMPS: dict[str, list[tuple[str, float]]] = {}


def _stamp(request_id: str, name: str) -> None:
    STAMPS.setdefault(request_id, []).append((name, time.perf_counter()))


@contextlib.contextmanager
def _span(request_id: str, label: str) -> Iterator[None]:
    """Stamp ``label>`` now and ``label<`` when the block ends, however it ends."""
    _stamp(request_id, f"{label}>")
    try:
        yield
    finally:
        _stamp(request_id, f"{label}<")


def _wrap_async(owner: Any, attribute: str, label: str, request_id: Callable[..., str]) -> None:
    original = getattr(owner, attribute)

    @functools.wraps(original)
    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _span(request_id(*args, **kwargs), label):
            return await original(*args, **kwargs)

    setattr(owner, attribute, wrapped)


def _wrap_sync(owner: Any, attribute: str, label: str, request_id: Callable[..., str]) -> None:
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _span(request_id(*args, **kwargs), label):
            return original(*args, **kwargs)

    setattr(owner, attribute, wrapped)


def _wrap_future(owner: Any, attribute: str, label: str, request_id: Callable[..., str]) -> None:
    """A method returning an awaitable it has already started (the journal's admission)."""
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        rid = request_id(*args, **kwargs)
        _stamp(rid, f"{label}>")
        result = original(*args, **kwargs)
        if hasattr(result, "add_done_callback"):
            result.add_done_callback(lambda _: _stamp(rid, f"{label}<"))
        return result

    setattr(owner, attribute, wrapped)


def install(path: str) -> None:
    from image_server.journal import Journal
    from image_server.lifecycle import RequestTracker
    from image_server.manager import GeneratorManager
    from image_server.outbox import Outbox
    from image_server.storage import OutputStore

    by_request: Callable[..., str] = lambda self, request, *a, **k: request.request_id  # noqa: E731
    by_ticket: Callable[..., str] = lambda self, ticket, *a, **k: ticket.request_id  # noqa: E731
    _wrap_async(RequestTracker, "on_render", "receive", by_request)
    _wrap_future(Outbox, "record", "journal_admit", by_ticket)
    _wrap_async(Outbox, "accepted", "publish_accepted", by_ticket)
    _wrap_async(GeneratorManager, "generate", "generate", lambda self, name, job, *a, **k: job.request.request_id)
    _wrap_sync(OutputStore, "store", "store", by_request)
    _wrap_async(Outbox, "finish", "finish", by_ticket)
    _wrap_async(Journal, "finish", "journal_finish", lambda self, rid, *a, **k: rid)
    atexit.register(lambda: _dump(path))


def _dump(path: str) -> None:
    with open(path, "w") as handle:
        json.dump(STAMPS, handle)
