"""Pydantic models for every message on the wire, with their bounds.

Images travel three ways: inbound as an ``ImageSource`` (a ``file://``, ``http(s)://`` or
``data:`` URI, or raw base64), outbound per ``DeliveryMode`` (a file path and ``file://``
URI, inline base64, a raw ZMQ frame referenced by index, or a provider URL).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
# Generator, project, channel and client names end up in file paths and topics: keep them
# to a conservative character set that cannot traverse directories.
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$"
MAX_PROMPT_CHARS = 10_000
MAX_REFERENCE_IMAGES = 10
MAX_BATCH = 64
MIN_SIDE = 64
MAX_SIDE = 4096

OutputFormat = Literal["png", "jpeg", "webp"]
DeliveryMode = Literal["file", "inline", "frames", "url"]
ErrorCode = Literal[
    "invalid_request",
    "unknown_generator",
    "unsupported",
    "reference_image",
    "prompt_too_long",
    "rate_limited",
    "content_policy",
    "timeout",
    "generation_failed",
    "cancelled",
    "superseded",
    "overloaded",
    "storage",
    "over_budget",
    "internal",
]

RequestId = Annotated[str, Field(pattern=REQUEST_ID_PATTERN)]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class _Inbound(BaseModel):
    """Client -> service: unknown fields are ignored (see the package docstring)."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class _Outbound(BaseModel):
    """Service -> client events: every one names its service and carries a monotonic seq."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    service_id: str = ""
    seq: int = 0


class ImageSource(_Inbound):
    """A reference image: exactly one of ``uri``, ``image_data`` or ``frame``.

    ``uri`` is ``file://`` (only under the service's allowed roots), ``http(s)://`` (public
    addresses only unless the service allows private ones) or ``data:``. ``image_data`` is
    base64, with or without a ``data:image/...;base64,`` prefix. ``frame`` is the index of
    the image's raw bytes among the message's extra frames (``[topic, json, *blobs]``): the
    cheapest way to send big images, with no base64 and nothing for a JSON parser to wade
    through. Size and pixel caps are the service's (see config ``[references]``).
    """

    uri: str | None = Field(default=None, max_length=64 * 1024 * 1024)
    image_data: str | None = None
    frame: int | None = Field(default=None, ge=0, le=63)

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageSource:
        if sum(value is not None for value in (self.uri, self.image_data, self.frame)) != 1:
            raise ValueError("an ImageSource needs exactly one of 'uri', 'image_data' or 'frame'")
        return self


class LoraSpec(_Inbound):
    """A LoRA by name (as the provider knows it) or URL, with its strength."""

    name: str = Field(min_length=1, max_length=2048)
    strength: float = Field(default=1.0, ge=-4.0, le=4.0)


class RenderRequest(_Inbound):
    """Ask the service for one or more images."""

    type: Literal["RenderRequest"] = "RenderRequest"
    request_id: RequestId
    generator: Name | None = None
    # Required, except in a batch (``prompts``), where it may be left empty.
    prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    width: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE)
    height: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    steps: int | None = Field(default=None, ge=1, le=200)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=50.0)
    strength: float | None = Field(default=None, ge=0.0, le=1.0)
    num_images: int = Field(default=1, ge=1, le=8)
    reference_image: ImageSource | None = None
    reference_images: list[ImageSource] = Field(default_factory=list, max_length=MAX_REFERENCE_IMAGES)
    depth_map: ImageSource | None = None
    loras: list[LoraSpec] = Field(default_factory=list, max_length=16)
    style: str | None = Field(default=None, max_length=256)
    output_format: OutputFormat = "png"
    delivery: DeliveryMode = "file"
    generator_config: dict[str, Any] = Field(default_factory=dict)
    fallbacks: list[Name] = Field(default_factory=list, max_length=8)
    priority: int = Field(default=0, ge=-100, le=100)
    timeout_s: float | None = Field(default=None, gt=0, le=3600)
    reply_to: Name | None = None
    channel: Name | None = None
    clear_queue: bool = False
    project: Name | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    # Spend and reuse (all optional: older clients send none of them).
    # The most this request may cost (in the price table's currency): refused with
    # ``over_budget`` before anything is spent when the estimate, or a fallback's, is higher.
    max_cost: float | None = Field(default=None, ge=0)
    # Answer from the result cache when an identical earlier render exists (None: the
    # generator's config decides). A request without a seed is never cached unless
    # ``cache_any_seed`` says the user accepts an earlier random-seed image.
    cache: bool | None = None
    cache_any_seed: bool = False
    # A batch: one render per prompt, with this request's other parameters. Member i runs as
    # request ``<request_id>:<i>`` with its own RenderAccepted and terminal event (which carry
    # batch_id and batch_index); a BatchDone under this request_id follows the last of them.
    # Cancelling this request_id cancels the members still running.
    prompts: list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]] | None = Field(
        default=None, min_length=1, max_length=MAX_BATCH
    )
    # Set by the service on batch members (a client sends the batch, not its members).
    batch_id: str | None = None
    batch_index: int | None = None

    @model_validator(mode="after")
    def _bounded_references(self) -> RenderRequest:
        if len(self.all_references()) > MAX_REFERENCE_IMAGES:
            raise ValueError(f"at most {MAX_REFERENCE_IMAGES} reference images in all")
        if not self.prompt and not self.prompts:
            raise ValueError("prompt: a prompt is required (or prompts, for a batch)")
        if self.prompts and len(self.request_id) + 1 + len(str(len(self.prompts) - 1)) > 128:
            raise ValueError("request_id: too long for a batch (its members add ':<index>', 128 characters in all)")
        return self

    def batch_members(self) -> list[RenderRequest]:
        """One request per prompt of a batch (empty when this is not one)."""
        return [
            self.model_copy(
                update={
                    "request_id": f"{self.request_id}:{index}",
                    "prompt": prompt,
                    "prompts": None,
                    "batch_id": self.request_id,
                    "batch_index": index,
                    # One channel slot and one queue clearing per batch, not per member.
                    "channel": None,
                    "clear_queue": False,
                }
            )
            for index, prompt in enumerate(self.prompts or ())
        ]

    def frames_used(self) -> set[int]:
        """Indexes of the extra frames this request's images refer to."""
        sources = [*self.all_references(), *([self.depth_map] if self.depth_map else [])]
        return {source.frame for source in sources if source.frame is not None}

    def all_references(self) -> list[ImageSource]:
        """``reference_image`` (if any) followed by ``reference_images``."""
        first = [self.reference_image] if self.reference_image is not None else []
        return first + list(self.reference_images)


class CancelRequest(_Inbound):
    """End a queued or running request with ``RenderError(code="cancelled")``."""

    type: Literal["CancelRequest"] = "CancelRequest"
    request_id: RequestId
    reply_to: Name | None = None


class StatusRequest(_Inbound):
    """Ask for a ``ServiceStatus``."""

    type: Literal["StatusRequest"] = "StatusRequest"
    request_id: RequestId | None = None
    reply_to: Name | None = None


class RenderAccepted(_Outbound):
    """The request was validated and taken on; exactly one terminal event will follow."""

    type: Literal["RenderAccepted"] = "RenderAccepted"
    request_id: str
    generator: str
    queue_position: int = 0
    estimated_cost: float | None = None  # in the price table's currency; None: no price known


class RenderProgress(_Outbound):
    """A step on the way: queued (with position), started, provider progress, storing."""

    type: Literal["RenderProgress"] = "RenderProgress"
    request_id: str
    stage: Literal["queued", "started", "generating", "storing"]
    generator: str | None = None
    queue_position: int | None = None
    progress: float | None = Field(default=None, ge=0.0, le=1.0)
    message: str | None = None


class OutputImage(BaseModel):
    """One produced image. How it travels depends on the request's ``delivery``:
    ``file`` sets ``path`` and a ``file://`` ``uri``; ``inline`` sets ``data`` (base64);
    ``frames`` sets ``frame``, the index of the raw bytes among the message's extra frames;
    ``url`` sets ``uri`` to the provider's URL (or the stored file's where there is none).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    uri: str | None = None
    path: str | None = None
    data: str | None = None
    frame: int | None = None
    width: int
    height: int
    format: OutputFormat
    seed: int | None = None
    sha256: str | None = None


class Timings(BaseModel):
    """Milliseconds spent in each stage of a request."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    queued: float = 0.0
    normalize: float = 0.0
    generate: float = 0.0
    store: float = 0.0
    total: float = 0.0
    # Reported by providers that queue jobs themselves (RunPod: delayTime, executionTime); None elsewhere.
    provider_queue: float | None = None
    provider_execution: float | None = None


class ImageReady(_Outbound):
    """Terminal success."""

    type: Literal["ImageReady"] = "ImageReady"
    request_id: str
    generator: str
    images: list[OutputImage]
    uri: str | None = None
    prompt: str | None = None
    timings: Timings = Field(default_factory=Timings)
    attempts: int = 1
    applied: dict[str, Any] = Field(default_factory=dict)
    ignored: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    cost: float | None = None  # what this request was charged (0 for a cache hit); None: no price known
    cached: bool = False  # answered from the result cache, not rendered for this request
    cached_from: str | None = None  # the request_id whose render this answer reuses (cache or coalescing)
    batch_id: str | None = None  # set on a batch member's events: the batch's request_id
    batch_index: int | None = None  # and the member's index in its ``prompts``


class RenderError(_Outbound):
    """Terminal failure with a stable ``code``; ``message`` is for humans and holds no secrets."""

    type: Literal["RenderError"] = "RenderError"
    request_id: str
    code: ErrorCode
    message: str
    retryable: bool = False
    generator: str | None = None
    attempts: int = 0
    metadata: dict[str, Any] = Field(default_factory=dict)
    batch_id: str | None = None
    batch_index: int | None = None


class BatchMemberOutcome(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    index: int
    request_id: str
    type: Literal["ImageReady", "RenderError"]
    code: str | None = None  # the RenderError's code


class BatchDone(_Outbound):
    """After the last member of a batch ended: what became of each (their own events came first)."""

    type: Literal["BatchDone"] = "BatchDone"
    request_id: str
    generator: str | None = None  # the one the batch asked for (members say which served them)
    members: list[BatchMemberOutcome] = Field(default_factory=list)
    succeeded: int = 0
    failed: int = 0
    cost: float | None = None  # the members' costs together (None: no price known)
    metadata: dict[str, Any] = Field(default_factory=dict)


class RequestConflict(_Outbound):
    """A message named a ``request_id`` that another request holds (another client's, or a
    finished one the message does not match); nothing was done with it. Not a terminal
    event: the request that holds the id still ends with exactly one."""

    type: Literal["RequestConflict"] = "RequestConflict"
    request_id: str
    message: str


class Heartbeat(_Outbound):
    """Published every ``heartbeat_interval_s``; clients wait for one before sending."""

    type: Literal["Heartbeat"] = "Heartbeat"
    interval_s: float = 1.0
    uptime_s: float = 0.0
    in_flight: int = 0
    queued: int = 0
    version: str = ""  # the service's package version


class GeneratorStatus(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    strategy: str
    in_flight: int = 0
    concurrency: int = 1
    cooling_down_until: float | None = None
    image_to_image: bool = False
    spent_today: float = 0.0  # UTC day, in the price table's currency
    spent_month: float = 0.0  # UTC calendar month
    over_budget: bool = False  # a daily or monthly budget is spent: requests for it get over_budget


class WorkerStatus(BaseModel):
    """One live worker in distributed mode (from its heartbeat entry)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    worker_id: str
    host: str
    generators: list[str] = Field(default_factory=list)
    in_flight: int = 0
    concurrency: int = 1
    uptime_s: float = 0.0


class ClusterStatus(BaseModel):
    """Distributed mode: live workers, requests waiting per priority band, redeliveries."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    workers: list[WorkerStatus] = Field(default_factory=list)
    queued: dict[str, int] = Field(default_factory=dict)  # band -> requests not yet delivered
    running: dict[str, int] = Field(default_factory=dict)  # band -> delivered, not yet acknowledged
    redelivered: int = 0  # deliveries now pending that are not the first


class ServiceStatus(_Outbound):
    """Answer to ``StatusRequest``."""

    type: Literal["ServiceStatus"] = "ServiceStatus"
    request_id: str | None = None
    default_generator: str
    generators: list[GeneratorStatus] = Field(default_factory=list)
    queued: int = 0
    in_flight: int = 0
    uptime_s: float = 0.0
    counters: dict[str, int] = Field(default_factory=dict)
    version: str = ""  # the service's package version
    journal_bytes: int | None = None  # what the journal holds now (None: no journal)
    journal_max_bytes: int | None = None  # its quota (journal.max_bytes); None: no quota
    cluster: ClusterStatus | None = None  # distributed mode only


InboundMessage = Annotated[RenderRequest | CancelRequest | StatusRequest, Field(discriminator="type")]
OutboundEvent = Annotated[
    RenderAccepted
    | RenderProgress
    | ImageReady
    | RenderError
    | RequestConflict
    | BatchDone
    | Heartbeat
    | ServiceStatus,
    Field(discriminator="type"),
]
Message = Annotated[
    RenderRequest
    | CancelRequest
    | StatusRequest
    | RenderAccepted
    | RenderProgress
    | ImageReady
    | RenderError
    | RequestConflict
    | BatchDone
    | Heartbeat
    | ServiceStatus,
    Field(discriminator="type"),
]
