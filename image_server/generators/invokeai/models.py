"""Model lookup through InvokeAI's models API, by name or key, cached per model type.

A request's model, LoRAs and FLUX components are resolved against ``GET /api/v2/models/``
listings, kept for ``ttl_s`` and dropped early when a render fails (a model may have been
removed or reinstalled under a new key).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from image_server.errors import InvalidRequest, Unsupported
from image_server.generators.invokeai.graph import FAMILY_OF_BASE, ModelRef

Lister = Callable[[str], Awaitable[list[ModelRef]]]
SHOWN = 12  # installed models named in a "not found" message


class ModelCatalog:
    def __init__(self, lister: Lister, *, generator: str, ttl_s: float) -> None:
        self._list = lister
        self.generator = generator
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, list[ModelRef]]] = {}

    def invalidate(self) -> None:
        self._cache.clear()

    async def listing(self, model_type: str, *, fresh: bool = False) -> list[ModelRef]:
        cached = self._cache.get(model_type)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.ttl_s and not fresh:
            return cached[1]
        models = await self._list(model_type)
        self._cache[model_type] = (now, models)
        return models

    async def _find(self, model_type: str, pick: Callable[[list[ModelRef]], ModelRef]) -> ModelRef:
        """``pick`` from the cached listing; a miss asks the server again before it counts (the
        model may have been installed since the listing was cached)."""
        entry = self._cache.get(model_type)
        cached = entry is not None and time.monotonic() - entry[0] < self.ttl_s
        try:
            return pick(await self.listing(model_type))
        except InvalidRequest:
            if not cached:
                raise
        return pick(await self.listing(model_type, fresh=True))

    async def main_model(self, wanted: str, base: str | None) -> ModelRef:
        """The main model named (or keyed) ``wanted``; its family must be one we build graphs for."""
        model = await self._find("main", lambda installed: self._pick(installed, wanted, base, what="main model"))
        if model.base not in FAMILY_OF_BASE:
            families = ", ".join(FAMILY_OF_BASE)
            raise Unsupported(
                f"{self.generator}: model {model.name!r} is a {model.base} model; "
                f"the invokeai strategy builds graphs for {families}",
                generator=self.generator,
            )
        return model

    async def lora(self, wanted: str, base: str) -> ModelRef:
        """An installed LoRA by name or key, for the main model's base."""
        return await self._find("lora", lambda installed: self._pick_lora(installed, wanted, base))

    def _pick_lora(self, installed: list[ModelRef], wanted: str, base: str) -> ModelRef:
        matches = [m for m in installed if wanted in (m.key, m.name)]
        usable = [m for m in matches if m.base == base]
        if usable:
            return usable[0]
        if matches:
            bases = ", ".join(sorted({m.base for m in matches}))
            raise InvalidRequest(
                f"{self.generator}: LoRA {wanted!r} is for {bases}, but the model is {base}", generator=self.generator
            )
        raise InvalidRequest(
            f"{self.generator}: no LoRA named {wanted!r} is installed in InvokeAI"
            f"{self._installed([m for m in installed if m.base == base])}",
            generator=self.generator,
        )

    async def component(self, model_type: str, wanted: str | None, base: str | None, what: str) -> ModelRef:
        """A FLUX component (``t5_encoder``, ``clip_embed``, ``vae``): the named one, or the first installed."""

        def pick(installed: list[ModelRef]) -> ModelRef:
            if wanted is not None:
                return self._pick(installed, wanted, base, what=what)
            candidates = [m for m in installed if base is None or m.base == base]
            if not candidates:
                raise InvalidRequest(
                    f"{self.generator}: FLUX needs a {what}, and none is installed in InvokeAI",
                    generator=self.generator,
                )
            return candidates[0]

        return await self._find(model_type, pick)

    def _pick(self, installed: list[ModelRef], wanted: str, base: str | None, *, what: str) -> ModelRef:
        by_key = [m for m in installed if m.key == wanted]
        if by_key:
            return by_key[0]
        named = [m for m in installed if m.name == wanted and (base is None or m.base == base)]
        if len(named) == 1:
            return named[0]
        if named:
            bases = ", ".join(sorted({m.base for m in named}))
            raise InvalidRequest(
                f"{self.generator}: more than one {what} is named {wanted!r} ({bases}); set 'base' to choose",
                generator=self.generator,
            )
        where = f" for {base}" if base else ""
        raise InvalidRequest(
            f"{self.generator}: no {what} named {wanted!r}{where} is installed in InvokeAI{self._installed(installed)}",
            generator=self.generator,
        )

    @staticmethod
    def _installed(models: list[ModelRef]) -> str:
        if not models:
            return " (none installed)"
        shown = ", ".join(f"{m.name} ({m.base})" for m in models[:SHOWN])
        return f"; installed: {shown}{', ...' if len(models) > SHOWN else ''}"
