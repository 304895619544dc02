"""Following one prompt to its end: its ``/ws`` events, or ``/history`` polling without them.

Only events whose ``prompt_id`` is ours count (``EventHub`` routes by it and drops queue
``status`` broadcasts, binary preview frames and other prompts' events).
``executing`` with ``node: null`` ends the prompt; ``execution_error`` and
``execution_interrupted`` end it too (they are not always followed by the null node).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httpx

from image_server.errors import GenerationFailed
from image_server.generators.base import ProgressCallback
from image_server.generators.comfyui.events import Event
from image_server.generators.comfyui.wire import (
    HistoryEntry,
    as_dict,
    execution_failed,
    history_entry,
    interrupted,
    queue_ids,
)
from image_server.generators.http import error_for_status, translate_transport_errors

logger = logging.getLogger(__name__)
MAX_POLL_ERRORS = 5  # consecutive failed /history polls (a restarting server) before giving up


class WebsocketLost(Exception):
    """The socket closed before our prompt ended; the caller polls /history instead."""


async def follow_events(
    events: asyncio.Queue[Event],
    prompt_id: str,
    *,
    progress: ProgressCallback,
    generator: str,
    on_output: Callable[[str, dict[str, Any]], None] = lambda node, output: None,
    quiet_s: float = 30.0,
) -> dict[str, Any]:
    """Outputs seen in ``executed`` events (node -> output) once ``prompt_id`` ends.

    ``events`` holds this prompt's events only (see ``EventHub``). Raises
    ``GenerationFailed`` for an execution error or interrupt, ``WebsocketLost`` when the
    socket goes first or says nothing about the prompt for ``quiet_s`` seconds.
    """
    outputs: dict[str, Any] = {}
    while True:
        try:
            event = await asyncio.wait_for(events.get(), quiet_s)
        except TimeoutError:
            logger.info("%s: no event about %s for %g s; polling /history", generator, prompt_id, quiet_s)
            raise WebsocketLost from None
        if event is None:
            break
        kind, data = event.get("type"), as_dict(event.get("data"))
        if data.get("prompt_id") != prompt_id:
            continue
        if kind == "progress":
            value, maximum = data.get("value"), data.get("max")
            if isinstance(value, int | float) and isinstance(maximum, int | float) and maximum > 0:
                progress(min(1.0, max(0.0, value / maximum)), f"{value}/{maximum} (node {data.get('node')})")
        elif kind == "execution_start":
            progress(None, "running")
        elif kind == "executed":
            node, output = str(data.get("node")), as_dict(data.get("output"))
            outputs[node] = output
            on_output(node, output)
        elif kind == "execution_error":
            raise execution_failed(data, generator=generator)
        elif kind == "execution_interrupted":
            raise interrupted(data, generator=generator)
        elif kind == "executing" and data.get("node") is None:
            return outputs
    raise WebsocketLost


async def poll_history(client: httpx.AsyncClient, prompt_id: str, *, interval: float, generator: str) -> HistoryEntry:
    """``GET /history/{id}`` until the prompt has an entry, riding out a few failed polls.

    A prompt with no history that is neither running nor queued is gone (the server restarted
    and forgot it): that is a retryable failure, not a wait until the request times out.
    """
    failures = 0
    while True:
        try:
            entry = await _history(client, prompt_id, generator=generator)
            known = entry is not None or await _queued(client, prompt_id, generator=generator)
            if not known:
                entry = await _history(client, prompt_id, generator=generator)  # it may have just finished
            failures = 0
        except GenerationFailed as exc:
            failures += 1
            if not exc.retryable or failures >= MAX_POLL_ERRORS:
                raise
            logger.info("%s: /history poll failed (%s); polling on", generator, exc)
        else:
            if entry is not None:
                return entry
            if not known:
                raise GenerationFailed(
                    f"{generator}: ComfyUI no longer knows prompt {prompt_id} (restarted?)",
                    generator=generator,
                    retryable=True,
                )
        await asyncio.sleep(interval)


async def _history(client: httpx.AsyncClient, prompt_id: str, *, generator: str) -> HistoryEntry | None:
    with translate_transport_errors(generator):
        response = await client.get(f"/history/{prompt_id}")
    if response.status_code != 200:
        raise error_for_status(response.status_code, "polling /history failed", generator=generator)
    return history_entry(response.content, prompt_id, generator=generator)


async def _queued(client: httpx.AsyncClient, prompt_id: str, *, generator: str) -> bool:
    with translate_transport_errors(generator):
        response = await client.get("/queue")
    if response.status_code != 200:
        raise error_for_status(response.status_code, "reading /queue failed", generator=generator)
    try:
        running, pending = queue_ids(response.content)
    except ValueError as exc:
        raise GenerationFailed(
            f"{generator}: ComfyUI answered /queue with malformed JSON", generator=generator
        ) from exc
    return prompt_id in running or prompt_id in pending
