"""``[prompting]`` in config.toml."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.messages import MAX_PROMPT_CHARS

OnTooLong = Literal["refuse", "compress", "truncate"]
Fallback = Literal["refuse", "truncate", "as_is"]

DEFAULT_INSTRUCTIONS = (
    "You shorten prompts for an image generator. Rewrite the user's prompt in at most {limit} "
    "characters. Keep the subject, the style words and the most specific details; drop repetition "
    "and filler. Answer with the rewritten prompt only, no quotes, no comments."
)


class OllamaConfig(BaseModel):
    """The local LLM that compresses prompts (``POST /api/generate``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = "http://127.0.0.1:11434"
    model: str = "llama3.2:1b"
    instructions: str = DEFAULT_INSTRUCTIONS  # "{limit}" is replaced by the provider's limit
    keep_alive: str = "5m"  # how long Ollama keeps the model loaded after a call
    timeout_s: float = Field(default=10.0, gt=0, le=600)  # the whole call; past it the fallback applies
    stream: bool = False  # stream the answer (NDJSON) instead of one JSON body
    temperature: float = Field(default=0.0, ge=0, le=2)


class PromptingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Over this a prompt ends with prompt_too_long whatever the provider (the wire caps it too).
    hard_limit_chars: int = Field(default=MAX_PROMPT_CHARS, ge=1, le=MAX_PROMPT_CHARS)
    # A prompt over its generator's limit (but under the hard limit) is refused, compressed or truncated.
    on_too_long: OnTooLong = "refuse"
    per_generator: dict[str, OnTooLong] = Field(default_factory=dict)
    # When compression fails (Ollama down, slow, or its answer still too long).
    fallback: Fallback = "truncate"
    ollama: OllamaConfig = OllamaConfig()
