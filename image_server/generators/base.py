"""The generator plug-in interface: config model, capabilities, job and result types.

A strategy subclasses ``Generator``, names its pydantic ``config_model`` and overrides
``generate()`` (and ``aclose()`` if it holds resources). Provider errors are translated
into ``image_server.errors`` at the strategy's own boundary.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field

from image_server.errors import PromptTooLong, Unsupported
from image_server.generators.scrubbing import scrubbed_errors
from schemas import RenderRequest

if TYPE_CHECKING:
    from PIL import Image


class ProgressCallback(Protocol):
    """How a generator reports progress: a fraction, a message, and the provider's queue
    position while the job waits in a provider's own queue (fal)."""

    def __call__(self, fraction: float | None, message: str | None, /, queue_position: int | None = None) -> None: ...


def no_progress(fraction: float | None, message: str | None, /, queue_position: int | None = None) -> None:
    """The default ``ProgressCallback``: progress goes nowhere."""


# Parameters a generator may honour or, if it cannot, must report as ignored.
SOFT_PARAMETERS = ("seed", "negative_prompt", "steps", "guidance_scale", "strength", "style")


class GeneratorConfig(BaseModel):
    """Fields every ``[generators.<name>]`` table has; strategies extend it.

    ``OVERRIDABLE`` lists the fields a request's ``generator_config`` may change. Anything
    else (credentials, URLs, endpoints, paths, limits) is refused.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    OVERRIDABLE: ClassVar[frozenset[str]] = frozenset()

    strategy: str
    concurrency: int = Field(default=4, ge=1, le=1024)
    timeout_s: float = Field(default=120.0, gt=0, le=3600)
    fallbacks: list[str] = Field(default_factory=list)
    retries: int = Field(default=2, ge=0, le=10)
    retry_backoff_s: float = Field(default=0.5, ge=0, le=60)
    cooldown_after: int = Field(default=5, ge=1)
    cooldown_s: float = Field(default=30.0, ge=0)

    def startup_warnings(self) -> list[str]:
        """What a user should hear about when the service starts with this config (a model the
        provider has retired, ...): the manager logs each one as a warning. Cheap, no I/O."""
        return []


class Capabilities(BaseModel):
    """What a generator can do. The service refuses (``unsupported``) what it cannot, and
    lists in ``ignored`` the soft parameters it does not honour."""

    model_config = ConfigDict(frozen=True)

    text_to_image: bool = True
    image_to_image: bool = False
    max_reference_images: int = 0
    depth_map: bool = False
    loras: bool = False
    min_size: int = 64
    max_size: int = 4096
    max_images: int = 1
    max_prompt_chars: int | None = None
    parameters: frozenset[str] = frozenset({"seed"})
    # Renders in this process and spends nothing elsewhere (no provider job, no bill): a
    # request may start on it while the journal is still writing the request down.
    in_process: bool = False


@dataclass(frozen=True)
class ReferenceImage:
    """A validated reference image, still encoded (decode it in a thread with ``to_pil``)."""

    data: bytes
    format: str
    width: int
    height: int

    @property
    def mime(self) -> str:
        return f"image/{self.format}"

    def to_pil(self, at_least: tuple[int, int] | None = None) -> Image.Image:
        """Decode (blocking: call from a worker thread).

        With ``at_least`` (width, height), a JPEG may be decoded at 1/2, 1/4 or 1/8 scale,
        never smaller than that on either side: for a caller that resizes to that size
        anyway, a 4096x4096 photo costs a 512x512 decode instead of 64 MB of pixels.
        """
        import io

        from PIL import Image

        with Image.open(io.BytesIO(self.data)) as img:
            if at_least is not None:
                img.draft(None, at_least)  # a no-op for formats other than JPEG
            img.load()
            return img.copy()


@dataclass
class RenderJob:
    """Everything a generator needs for one attempt at one request."""

    request: RenderRequest
    references: list[ReferenceImage] = field(default_factory=list)
    depth_map: ReferenceImage | None = None
    attempt: int = 1
    progress: ProgressCallback = field(default=no_progress)

    @property
    def width(self) -> int:
        return self.request.width or 1024

    @property
    def height(self) -> int:
        return self.request.height or 1024


@dataclass(frozen=True)
class GeneratedImage:
    """One image from a generator: encoded ``data``, a decoded ``image``, or only a ``url``
    (delivery ``url``). ``format`` names the encoding of ``data``."""

    data: bytes | None = None
    image: Image.Image | None = None
    url: str | None = None
    format: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None


@dataclass
class GenerationResult:
    images: list[GeneratedImage]
    prompt: str | None = None
    applied: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    # The provider's own figures in ms, for ImageReady.timings: provider_queue, provider_execution.
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class HealthReport:
    ok: bool
    detail: str


class Generator:
    """Base class of every strategy; use as ``async with generator:``.

    Subclasses set ``strategy`` and ``config_model`` and override ``generate()``. ``environ``
    is where keys are read from (``os.environ`` unless given, e.g. by tests or an embedding
    application); strategies read it in ``open()``, never at import or construction time.
    """

    strategy: ClassVar[str] = ""
    config_model: ClassVar[type[GeneratorConfig]] = GeneratorConfig

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every strategy's ``generate`` and ``health`` are scrubbed of its secrets
        (``generators.scrubbing``): provider text may quote the key, whatever the strategy did."""
        super().__init_subclass__(**kwargs)
        for method in ("generate", "health"):
            if method in cls.__dict__:
                setattr(cls, method, _scrubbed(cls.__dict__[method]))

    def __init__(
        self, config: GeneratorConfig, *, name: str | None = None, environ: Mapping[str, str] | None = None
    ) -> None:
        # A strategy handed another strategy's table would fail later on a missing field, or worse,
        # run with defaults where the user's values were meant: refuse it here.
        expected = type(self).config_model
        if not isinstance(config, expected):
            raise TypeError(f"{type(self).__name__} needs a {expected.__name__}, not {type(config).__name__}")
        self.config = config
        self.name = name or self.strategy
        self.environ: Mapping[str, str] = os.environ if environ is None else environ

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    async def open(self) -> None:
        """Acquire resources (HTTP clients, models). Called once before the first job."""

    async def generate(self, job: RenderJob) -> GenerationResult:
        raise NotImplementedError("The 'generate' method must be implemented.")  # pragma: no cover

    async def health(self) -> HealthReport:
        """A cheap check that the backend is reachable and credentials work."""
        return HealthReport(ok=True, detail="no check available for this strategy")

    async def aclose(self) -> None:
        """Release resources. Idempotent."""

    async def __aenter__(self) -> Generator:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r}>"


def _scrubbed(method: Callable[[Any, Any], Awaitable[Any]] | Callable[[Any], Awaitable[Any]]) -> Any:
    if getattr(method, "_scrubbed", False):
        return method

    @functools.wraps(method)
    async def scrubbed(self: Generator, *args: Any) -> Any:
        with scrubbed_errors(self) as scrubber:
            return scrubber.result(await method(self, *args))

    scrubbed._scrubbed = True  # type: ignore[attr-defined]
    return scrubbed


def check_request(capabilities: Capabilities, request: RenderRequest, generator: str) -> list[str]:
    """Refuse what the generator cannot do; return the soft parameters (and ``loras``) it will ignore."""

    def refuse(message: str) -> Unsupported:
        return Unsupported(message, request_id=request.request_id, generator=generator)

    references = request.all_references()
    if references and not capabilities.image_to_image:
        raise refuse(f"generator {generator!r} does not take reference images")
    if not references and not capabilities.text_to_image:
        raise refuse(f"generator {generator!r} needs a reference image")
    if len(references) > capabilities.max_reference_images:
        raise refuse(f"generator {generator!r} takes at most {capabilities.max_reference_images} reference images")
    if request.depth_map is not None and not capabilities.depth_map:
        raise refuse(f"generator {generator!r} does not take a depth map")
    if request.num_images > capabilities.max_images:
        raise refuse(f"generator {generator!r} makes at most {capabilities.max_images} images per request")
    for side in ("width", "height"):
        value = getattr(request, side)
        if value is not None and not capabilities.min_size <= value <= capabilities.max_size:
            raise refuse(
                f"{side} {value} is outside {capabilities.min_size}..{capabilities.max_size} for {generator!r}"
            )
    limit = capabilities.max_prompt_chars
    if limit is not None and len(request.prompt) > limit:
        raise PromptTooLong(
            f"prompt has {len(request.prompt)} characters; {generator!r} takes at most {limit}",
            request_id=request.request_id,
            generator=generator,
        )
    ignored = [
        name for name in SOFT_PARAMETERS if getattr(request, name) is not None and name not in capabilities.parameters
    ]
    # LoRAs are a soft parameter too: a generator without them renders the prompt and says so.
    return [*ignored, "loras"] if request.loras and not capabilities.loras else ignored
