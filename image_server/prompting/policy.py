"""What happens to a prompt over its generator's limit: refuse, compress or truncate.

The decision is made at admission (``plan``, no I/O): a prompt over the service's hard
limit ends with ``prompt_too_long``; one over the generator's declared limit
(``Capabilities.max_prompt_chars``) is refused (the capability check names the limit),
or planned for compression or truncation. The work is done when the request runs
(``apply``): compression asks Ollama, and if that fails (down, slow, still too long) the
configured fallback applies. ``ImageReady.applied`` says what happened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from image_server.errors import PromptTooLong
from image_server.prompting.ollama import CompressionFailed, OllamaCompressor
from image_server.prompting.settings import OnTooLong, PromptingConfig
from schemas import RenderRequest


@dataclass(frozen=True)
class PromptPlan:
    action: OnTooLong  # "compress" or "truncate"
    limit: int
    generator: str


def truncate_at_word(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters at the last word boundary (mid-word only
    when the first word alone is longer)."""
    if len(text) <= limit:
        return text
    cut = text[: limit + 1]  # the character at ``limit`` tells whether a word ends exactly there
    boundary = max(cut.rfind(space) for space in " \t\n")
    head = text[:boundary] if boundary > 0 else text[:limit]
    return head.rstrip(" \t\n,;:-") or text[:limit]


class PromptPolicy:
    def __init__(self, config: PromptingConfig, compressor: OllamaCompressor | None = None) -> None:
        self.config = config
        self.compressor = compressor

    def needs_compressor(self) -> bool:
        return "compress" in (self.config.on_too_long, *self.config.per_generator.values())

    def plan(self, request: RenderRequest, generator: str, limit: int | None) -> PromptPlan | None:
        """None: send the prompt as it is (it fits, or the capability check will refuse it)."""
        length = len(request.prompt)
        hard = self.config.hard_limit_chars
        if length > hard:
            raise PromptTooLong(
                f"prompt has {length} characters; the service takes at most {hard}",
                request_id=request.request_id,
                generator=generator,
            )
        if limit is None or length <= limit:
            return None
        action = self.config.per_generator.get(generator, self.config.on_too_long)
        return None if action == "refuse" else PromptPlan(action, limit, generator)

    def checked_prompt(self, request: RenderRequest, plan: PromptPlan) -> RenderRequest:
        """The request as the capability checks should see it (its prompt will fit)."""
        return request.model_copy(update={"prompt": truncate_at_word(request.prompt, plan.limit)})

    async def apply(self, request: RenderRequest, plan: PromptPlan) -> tuple[RenderRequest, dict[str, Any]]:
        """The request with its prompt as it will be sent, and what to add to ``applied``."""
        original = request.prompt
        applied: dict[str, Any] = {"prompt_original_chars": len(original)}
        if plan.action == "compress":
            try:
                final = await self._compress(original, plan.limit)
                applied["prompt_policy"] = "compressed"
            except CompressionFailed as exc:
                applied["prompt_policy_note"] = str(exc)
                final = self._fallback(request, plan, str(exc))
                applied["prompt_policy"] = "as_is" if final == original else "truncated"
        else:
            final = truncate_at_word(original, plan.limit)
            applied["prompt_policy"] = "truncated"
        applied["prompt_final_chars"] = len(final)
        return request.model_copy(update={"prompt": final}), applied

    async def _compress(self, prompt: str, limit: int) -> str:
        if self.compressor is None:
            raise CompressionFailed("no Ollama configured")
        text = await self.compressor.compress(prompt, limit)
        if not text:
            raise CompressionFailed("ollama answered with an empty prompt")
        if len(text) > limit:
            raise CompressionFailed(f"ollama's answer has {len(text)} characters, over the limit of {limit}")
        return text

    def _fallback(self, request: RenderRequest, plan: PromptPlan, reason: str) -> str:
        fallback = self.config.fallback
        if fallback == "refuse":
            raise PromptTooLong(
                f"prompt has {len(request.prompt)} characters; {plan.generator!r} takes at most {plan.limit}, "
                f"and compressing it failed: {reason}",
                request_id=request.request_id,
                generator=plan.generator,
            )
        return request.prompt if fallback == "as_is" else truncate_at_word(request.prompt, plan.limit)
