"""One request from accepted to ImageReady: references, attempts along the chain, store.

Sockets are not involved here, so the CLI's one-shot ``render`` uses the same path as the
service. Errors are raised as ``image_server.errors`` classes; the caller publishes them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from image_server.config import ReferencesConfig
from image_server.errors import GenerationTimeout, ImageServerError
from image_server.generators.base import GenerationResult, GeneratorConfig, ReferenceImage, RenderJob, check_request
from image_server.manager import GeneratorManager
from image_server.offload import run_store
from image_server.references import normalize_request_references
from image_server.resilience import run_chain
from image_server.storage import OutputStore
from schemas import ImageReady, RenderRequest, Timings

logger = logging.getLogger(__name__)

# (stage, progress fraction or None, message or None, queue position or None)
ProgressSink = Callable[[str, float | None, str | None, int | None], None]


# Awaited before a render does anything outside the process (see Gate use below).
Gate = Callable[[], Awaitable[None]]


async def _open_gate() -> None:
    pass


def _ignore_progress(stage: str, fraction: float | None, message: str | None, position: int | None) -> None:
    pass


@dataclass
class RenderOutcome:
    event: ImageReady
    blobs: list[bytes] = field(default_factory=list)


@dataclass
class RenderPlan:
    """What ``RenderPipeline.admit`` decided before a request is accepted: the generators
    to try in order (the first is the requested one, or its first capable fallback), the
    config each runs with (resolved once, the request's overrides applied to the first),
    the soft parameters each will ignore, and the client whose fair share it counts in."""

    chain: list[str]
    ignored: dict[str, list[str]]
    configs: dict[str, GeneratorConfig] = field(default_factory=dict)
    client: str = ""

    @property
    def generator(self) -> str:
        return self.chain[0]


@dataclass
class _Timer:
    received: float
    started: float | None = None
    normalize_s: float = 0.0


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class RenderPipeline:
    def __init__(
        self,
        manager: GeneratorManager,
        store: OutputStore,
        references: ReferencesConfig,
        *,
        default_project: str = "default",
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.manager = manager
        self.store = store
        self.references = references
        self.default_project = default_project
        self.http_client = http_client
        self.cooldowns = manager.cooldowns

    def admit(self, request: RenderRequest, *, client: str = "") -> RenderPlan:
        """Checks that need no I/O: generators known, overrides allowed, capabilities.

        The chain is the requested generator, then the request's ``fallbacks`` or else the
        generator's configured ones; generators that cannot serve the request are skipped.
        """
        primary = self.manager.resolve(request.generator)
        configs = {primary: self.manager.validate_overrides(primary, request.generator_config)}
        fallbacks = request.fallbacks or self.manager.config(primary).fallbacks
        names = list(dict.fromkeys([primary, *(self.manager.resolve(name) for name in fallbacks)]))
        chain: list[str] = []
        ignored: dict[str, list[str]] = {}
        first_refusal: ImageServerError | None = None
        for name in names:
            try:
                overrides = request.generator_config if name == primary else None
                ignored[name] = check_request(self.manager.capabilities(name, overrides), request, name)
            except ImageServerError as exc:
                first_refusal = first_refusal or exc
                continue
            chain.append(name)
            configs.setdefault(name, self.manager.config(name))
        if not chain:
            assert first_refusal is not None
            raise first_refusal
        return RenderPlan(chain, ignored, {name: configs[name] for name in chain}, client)

    async def run(
        self,
        request: RenderRequest,
        plan: RenderPlan,
        *,
        received_at: float | None = None,
        progress: ProgressSink = _ignore_progress,
        frames: Sequence[bytes | bytearray] = (),
        gate: Gate = _open_gate,
    ) -> RenderOutcome:
        """Render ``request``; ``frames`` are the message's extra frames (images sent raw).

        ``gate`` is awaited before anything leaves the process: a generator that does not
        render in-process, and files written. The service passes one that waits for the
        request's journal row, so rendering may start while that row is written.
        """
        timer = _Timer(time.perf_counter() if received_at is None else received_at)
        try:
            async with asyncio.timeout(request.timeout_s):
                return await self._run(request, plan, timer, progress, frames, gate)
        except TimeoutError as exc:
            if isinstance(exc, ImageServerError):
                raise
            raise GenerationTimeout(
                f"request did not finish within its timeout_s of {request.timeout_s:g} s",
                request_id=request.request_id,
                generator=plan.generator,
            ) from exc

    async def _run(
        self,
        request: RenderRequest,
        plan: RenderPlan,
        timer: _Timer,
        progress: ProgressSink,
        frames: Sequence[bytes | bytearray],
        gate: Gate,
    ) -> RenderOutcome:
        references: tuple[list[ReferenceImage], ReferenceImage | None] | None = None

        def on_generator_progress(
            fraction: float | None, message: str | None, /, queue_position: int | None = None
        ) -> None:
            progress("generating", fraction, message, queue_position)

        async def attempt(name: str, number: int) -> tuple[GenerationResult, float]:
            nonlocal references
            config = plan.configs[name]
            async with self.manager.scheduler.slot(
                name, config.concurrency, request.priority, owner=request.request_id, client=plan.client
            ):
                if timer.started is None:
                    timer.started = time.perf_counter()
                progress("started", None, name if number > 1 else None, None)
                if references is None:
                    normalize_start = time.perf_counter()
                    references = await normalize_request_references(
                        request, self.references, client=self.http_client, frames=frames
                    )
                    timer.normalize_s = time.perf_counter() - normalize_start
                if not self.manager.capabilities(name).in_process:
                    await gate()  # a provider's job or bill: only for a journaled request
                job = RenderJob(request, references[0], references[1], attempt=number, progress=on_generator_progress)
                overrides = request.generator_config if name == plan.chain[0] else {}
                generate_start = time.perf_counter()
                result = await self.manager.generate(name, job, overrides=overrides, config=config)
                return result, time.perf_counter() - generate_start

        outcome = await run_chain(plan.chain, attempt, config_for=plan.configs.__getitem__, cooldowns=self.cooldowns)
        result, generate_s = outcome.value
        name = outcome.generator
        if request.delivery not in ("frames", "inline"):
            await gate()  # files are written: a repeat of a finished request must not overwrite its files
        progress("storing", None, None, None)
        store_start = time.perf_counter()
        store = functools.partial(
            self.store.store,
            request,
            name,
            result.images,
            project=request.project or self.default_project,
            parameters=_parameters(request, name, result),
        )
        stored = store() if self.store.is_quick(request, result.images) else await run_store(store)
        done = time.perf_counter()
        started = timer.started or timer.received
        timings = Timings(
            queued=_ms(started - timer.received),
            normalize=_ms(timer.normalize_s),
            generate=_ms(generate_s),
            store=_ms(done - store_start),
            total=_ms(done - timer.received),
            provider_queue=result.timings.get("provider_queue"),
            provider_execution=result.timings.get("provider_execution"),
        )
        images = [item.output for item in stored]
        event = ImageReady(
            request_id=request.request_id,
            generator=name,
            images=images,
            uri=images[0].uri if images else None,
            prompt=result.prompt or request.prompt,
            timings=timings,
            attempts=outcome.attempts,
            applied=result.applied,
            ignored=list(dict.fromkeys([*plan.ignored.get(name, []), *result.ignored])),
            metadata=request.metadata,
        )
        return RenderOutcome(event, [item.blob for item in stored if item.blob is not None])


def _parameters(request: RenderRequest, generator: str, result: GenerationResult) -> dict[str, Any]:
    """What goes into the PNG text chunks: enough to reproduce the image."""
    fields = ("prompt", "negative_prompt", "width", "height", "seed", "steps", "guidance_scale", "strength", "style")
    parameters: dict[str, Any] = {k: getattr(request, k) for k in fields if getattr(request, k) is not None}
    parameters.update(request_id=request.request_id, generator=generator, applied=result.applied)
    if result.prompt and result.prompt != request.prompt:
        parameters["provider_prompt"] = result.prompt
    return parameters
