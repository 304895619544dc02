"""GeneratorManager: owns generator instances, their cache, slots and timeouts.

Instances are cached per (name, canonical JSON of the request's overrides) in a bounded
LRU; an evicted instance is closed once no render uses it. Work runs under the shared
``Scheduler`` (global in-flight bound, per-generator concurrency, priorities) and a
per-attempt timeout.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from image_server.errors import GenerationTimeout, GeneratorNotFound, InvalidRequest
from image_server.generators.base import Capabilities, GenerationResult, Generator, GeneratorConfig, RenderJob
from image_server.generators.registry import create_generator
from image_server.resilience import CooldownTracker
from image_server.scheduler import Scheduler

logger = logging.getLogger(__name__)

GeneratorFactory = Callable[[str, GeneratorConfig], Generator]


class ManagerState(enum.Enum):
    UNOPENED = 1  # created, generators not opened yet
    OPENED = 2  # inside `async with`, serving
    CLOSED = 3  # closed; cannot be reopened


@dataclass
class _CacheEntry:
    generator: Generator
    users: int = 0
    evicted: bool = False


def overrides_key(overrides: Mapping[str, Any]) -> str:
    """Canonical JSON so equal overrides share one cached instance."""
    return json.dumps(overrides, sort_keys=True, separators=(",", ":"), default=str)


class GeneratorManager:
    """Resolve names to generators and run jobs on them. Use as ``async with manager:``."""

    def __init__(
        self,
        configs: Mapping[str, GeneratorConfig],
        *,
        default: str,
        factory: GeneratorFactory = create_generator,
        cache_size: int = 8,
        max_in_flight: int = 32,
    ) -> None:
        if default not in configs:
            raise GeneratorNotFound(f"default generator {default!r} is not configured")
        self._configs = dict(configs)
        self.default = default
        self._factory = factory
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], _CacheEntry] = OrderedDict()
        self._creating: dict[tuple[str, str], asyncio.Future[_CacheEntry]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._capabilities: dict[tuple[str, str], Capabilities] = {}
        self.scheduler = Scheduler(max_in_flight=max_in_flight)
        # Each generator's health (consecutive failures, cool-down) lives with its instances.
        self.cooldowns = CooldownTracker()
        self._state = ManagerState.UNOPENED

    # -- names and capabilities -------------------------------------------------------

    def available(self) -> list[str]:
        return sorted(self._configs)

    def config(self, name: str) -> GeneratorConfig:
        return self._configs[self.resolve(name)]

    def resolve(self, name: str | None) -> str:
        """The configured name for ``name`` (the default when ``None``)."""
        if name is None:
            return self.default
        if name not in self._configs:
            raise GeneratorNotFound(
                f"unknown generator {name!r}; configured generators: {', '.join(self.available())}", generator=name
            )
        return name

    def capabilities(self, name: str, overrides: Mapping[str, Any] | None = None) -> Capabilities:
        """Capabilities from a (not opened) instance of the config with ``overrides``; cached.

        Overrides matter where they change what a generator takes (a comfyui request that picks
        another ``workflow`` may gain reference image slots)."""
        name = self.resolve(name)
        key = (name, overrides_key(overrides or {}))
        if key not in self._capabilities:
            if len(self._capabilities) >= 256:  # requests choose overrides: keep the cache bounded
                self._capabilities.clear()
            config = self.validate_overrides(name, overrides or {})
            self._capabilities[key] = self._factory(name, config).capabilities
        return self._capabilities[key]

    def is_image_to_image(self, name: str) -> bool:
        return self.capabilities(name).image_to_image

    def validate_overrides(self, name: str, overrides: Mapping[str, Any]) -> GeneratorConfig:
        """The config with ``overrides`` applied; only fields the strategy allows may change."""
        base = self._configs[self.resolve(name)]
        if not overrides:
            return base
        allowed = type(base).OVERRIDABLE
        refused = sorted(set(overrides) - allowed)
        if refused:
            hint = f"overridable: {', '.join(sorted(allowed))}" if allowed else "it allows no overrides"
            raise InvalidRequest(
                f"generator_config may not set {', '.join(refused)} on generator {name!r} ({hint})", generator=name
            )
        try:
            return type(base).model_validate({**base.model_dump(), **overrides})
        except ValidationError as exc:
            first = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InvalidRequest(f"generator_config.{where}: {first['msg']}", generator=name) from exc

    def startup_warnings(self) -> list[tuple[str, str]]:
        """(generator, warning) for every configured generator (see ``GeneratorConfig.startup_warnings``)."""
        return [(name, text) for name in self.available() for text in self._configs[name].startup_warnings()]

    # -- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> GeneratorManager:
        if self._state is not ManagerState.UNOPENED:
            raise RuntimeError(
                "Cannot open a manager more than once."
                if self._state is ManagerState.OPENED
                else "Cannot reopen a manager after it was closed."
            )
        self._state = ManagerState.OPENED
        for name, warning in self.startup_warnings():
            logger.warning("generator %s: %s", name, warning)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def preload(self) -> None:
        """Open now every generator whose config asks for it (``preload = true``), so a model
        that does not load fails at start-up, not on the first request."""
        for name, config in self._configs.items():
            if getattr(config, "preload", False):
                self._checkin(await self._checkout(name, {}))

    async def aclose(self) -> None:
        """Close every cached generator (idempotent)."""
        if self._state is ManagerState.CLOSED:
            return
        self._state = ManagerState.CLOSED
        entries = list(self._cache.values())
        self._cache.clear()
        await asyncio.gather(*(self._close(entry.generator) for entry in entries))
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def _close(self, generator: Generator) -> None:
        try:
            await generator.aclose()
        except Exception:
            logger.exception("closing generator %s failed", generator.name)

    # -- instances --------------------------------------------------------------------

    async def _checkout(self, name: str, overrides: Mapping[str, Any]) -> _CacheEntry:
        if self._state is not ManagerState.OPENED:
            raise RuntimeError("the manager is not open (use 'async with manager:')")
        key = (name, overrides_key(overrides))
        entry = self._cache.get(key)
        if entry is None:
            pending = self._creating.get(key)
            if pending is not None:
                entry = await asyncio.shield(pending)
            else:
                entry = await self._create(key, self.validate_overrides(name, overrides))
        self._cache.move_to_end(key)
        entry.users += 1
        return entry

    async def _create(self, key: tuple[str, str], config: GeneratorConfig) -> _CacheEntry:
        future: asyncio.Future[_CacheEntry] = asyncio.get_running_loop().create_future()
        self._creating[key] = future
        try:
            generator = self._factory(key[0], config)
            await generator.open()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            del self._creating[key]
        entry = _CacheEntry(generator)
        future.set_result(entry)
        self._cache[key] = entry
        self._evict()
        return entry

    def _evict(self) -> None:
        while len(self._cache) > self._cache_size:
            _, entry = self._cache.popitem(last=False)
            entry.evicted = True
            if entry.users == 0:
                self._close_soon(entry.generator)

    def _checkin(self, entry: _CacheEntry) -> None:
        entry.users -= 1
        if entry.evicted and entry.users == 0:
            self._close_soon(entry.generator)

    def _close_soon(self, generator: Generator) -> None:
        task = asyncio.get_running_loop().create_task(self._close(generator))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # -- running work -----------------------------------------------------------------

    async def generate(
        self,
        name: str,
        job: RenderJob,
        *,
        overrides: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
        config: GeneratorConfig | None = None,
    ) -> GenerationResult:
        """One attempt of ``job`` on generator ``name`` (slot already held by the caller).

        ``overrides`` default to the request's ``generator_config``. The timeout is the
        generator's ``timeout_s`` or ``timeout_s`` if smaller; expiry cancels the
        generator's work and raises ``GenerationTimeout``. ``config`` is the one the request
        was admitted with (resolved once); by default the configured one.
        """
        config = config or self._configs[name]
        limit = config.timeout_s if timeout_s is None else min(config.timeout_s, timeout_s)
        entry = await self._checkout(name, job.request.generator_config if overrides is None else overrides)
        try:
            async with asyncio.timeout(limit):
                return await entry.generator.generate(job)
        except TimeoutError as exc:
            if isinstance(exc, GenerationTimeout):
                raise
            raise GenerationTimeout(
                f"generator {name!r} did not finish within {limit:g} s",
                generator=name,
                request_id=job.request.request_id,
            ) from exc
        finally:
            self._checkin(entry)

    def slot(self, name: str, *, priority: int = 0, owner: str = "", client: str = "") -> Any:
        """Async context manager holding a global slot and one of ``name``'s slots."""
        return self.scheduler.slot(name, self._configs[name].concurrency, priority, owner=owner, client=client)

    def cached(self) -> list[tuple[str, str]]:
        """Keys of cached instances, least recently used first (for status and tests)."""
        return list(self._cache)

    def __repr__(self) -> str:
        return (
            f"<GeneratorManager state={self._state.name} generators={len(self._configs)} "
            f"cached={len(self._cache)} {self.scheduler!r}>"
        )
