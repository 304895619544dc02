"""Message models shared by image_server and its clients.

This package depends on pydantic only: client services install it without zmq, Pillow or
any provider SDK. Policy on unknown fields: inbound messages (client -> service) ignore
fields they do not know, so clients may upgrade on their own schedule and carry fields of
their own; anything a client wants echoed back goes in ``metadata``. Outbound events are
strict about their own fields but are parsed by clients with the same ignore policy.
"""

from __future__ import annotations

from schemas.messages import (
    REQUEST_ID_PATTERN,
    BatchDone,
    BatchMemberOutcome,
    CancelRequest,
    ClusterStatus,
    DeliveryMode,
    ErrorCode,
    GeneratorStatus,
    Heartbeat,
    ImageReady,
    ImageSource,
    InboundMessage,
    LoraSpec,
    Message,
    OutboundEvent,
    OutputFormat,
    OutputImage,
    RenderAccepted,
    RenderError,
    RenderProgress,
    RenderRequest,
    RequestConflict,
    ServiceStatus,
    StatusRequest,
    Timings,
    WorkerStatus,
)
from schemas.wire import (
    MESSAGE_ADAPTER,
    DecodedMessage,
    WireError,
    decode_frames,
    encode_message,
    event_topic,
    sniff_field,
    sniff_request_id,
)

__all__ = [
    "MESSAGE_ADAPTER",
    "REQUEST_ID_PATTERN",
    "BatchDone",
    "BatchMemberOutcome",
    "CancelRequest",
    "DecodedMessage",
    "DeliveryMode",
    "ErrorCode",
    "ClusterStatus",
    "GeneratorStatus",
    "Heartbeat",
    "ImageReady",
    "ImageSource",
    "InboundMessage",
    "LoraSpec",
    "Message",
    "OutboundEvent",
    "OutputFormat",
    "OutputImage",
    "RenderAccepted",
    "RenderError",
    "RenderProgress",
    "RenderRequest",
    "RequestConflict",
    "ServiceStatus",
    "WorkerStatus",
    "StatusRequest",
    "Timings",
    "WireError",
    "decode_frames",
    "encode_message",
    "event_topic",
    "sniff_field",
    "sniff_request_id",
]
