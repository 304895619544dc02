"""Every JetStream name in one place: streams, buckets, subjects, consumers and keys."""

from __future__ import annotations

import base64

REQUESTS_STREAM = "IMAGE_REQUESTS"
EVENTS_STREAM = "IMAGE_EVENTS"
RESULTS_BUCKET = "IMAGE_RESULTS"  # request id -> its terminal event (create-only)
CONTROL_BUCKET = "IMAGE_CONTROL"  # request id -> why it must end (cancel, supersede); "clear" -> clear_queue mark
CHANNELS_BUCKET = "IMAGE_CHANNELS"  # channel -> the request id now showing on it
WORKERS_BUCKET = "IMAGE_WORKERS"  # worker id -> its heartbeat (expires when the worker stops beating)
OUTPUTS_BUCKET = "IMAGE_OUTPUTS"  # rendered images and request frames (objects)

BANDS = ("high", "normal", "low")  # pulled in this order
REQUEST_SUBJECTS = "image.req.*"
EVENT_SUBJECTS = "image.evt.>"
CONTROL_NOTICE = "image.ctl"  # core NATS: cancel, supersede and clear_queue reach running workers now
WORK_NOTICE = "image.work"  # core NATS: "a request was queued in <band>", so idle workers pull at once

MSG_ID = "Nats-Msg-Id"
BODY_OBJECT = "Image-Body-Object"  # the request JSON is an object (too big for a message)
ACCEPTED_AT = "Image-Accepted-At"  # wall-clock time the gateway accepted it
OWNER = "Image-Owner"  # the sender it is scoped to (identity.owner_key): cancel, channels, clear_queue


def band_of(priority: int) -> str:
    return "high" if priority > 0 else "low" if priority < 0 else "normal"


def request_subject(band: str) -> str:
    return f"image.req.{band}"


def consumer_name(band: str) -> str:
    return f"workers-{band}"


def token(value: str) -> str:
    """``value`` as one subject token or KV key: request ids may hold ``:`` and ``.``,
    which KV keys and subject tokens cannot; URL-safe base64 has neither."""
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def control_key(owner: str, request_id: str) -> str:
    """Why ``request_id`` of ``owner`` must end: keyed by both, so no client can end another's."""
    return f"end.{token(owner or '-')}.{token(request_id)}"


def clear_key(owner: str) -> str:
    """The latest clear_queue mark of ``owner``."""
    return f"clear.{token(owner or '-')}"


def channel_key(owner: str, channel: str) -> str:
    return f"{token(owner or '-')}.{token(channel)}"


def event_subject(reply_to: str | None) -> str:
    return f"image.evt.{token(reply_to) if reply_to else '_'}"


def output_object(request_id: str, index: int) -> str:
    return f"out/{request_id}/{index}"


def frame_object(request_id: str, index: int) -> str:
    return f"req/{request_id}/{index}"


def body_object(request_id: str) -> str:
    return f"req/{request_id}/body"


def relay_consumer(service_id: str) -> str:
    """The durable event consumer of the gateway ``service_id`` (consumer names allow no dots)."""
    return f"relay-{token(service_id)}"
