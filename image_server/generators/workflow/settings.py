"""Config tables shared by the workflow strategies (comfyui, runpod): workflows, styles, LoRA stack nodes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Request fields a workflow can take, by the name used in ``inputs`` tables and ``{{placeholders}}``.
SCALAR_FIELDS = ("prompt", "negative_prompt", "seed", "width", "height", "steps", "cfg", "denoise")
MAX_REFERENCES = 10
REFERENCE_FIELDS = tuple(f"reference_image_{i}" for i in range(1, MAX_REFERENCES + 1))
ALL_FIELDS = frozenset((*SCALAR_FIELDS, "reference_images", "depth_map", *REFERENCE_FIELDS))


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraChoice(_Table):
    """A LoRA named in config: a file name as the server knows it, and an optional strength."""

    name: str = Field(min_length=1, max_length=512)
    strength: float | None = Field(default=None, ge=-4.0, le=4.0)


def _as_choice(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class StyleConfig(_Table):
    """``[generators.<name>.styles.<style>]``: what a request's ``style`` brings along."""

    lora: LoraChoice | None = None
    characters: list[LoraChoice] = Field(default_factory=list, max_length=10)
    cinematic: LoraChoice | None = None
    prompt_prefix: str = ""
    prompt_suffix: str = ""
    negative_prompt: str | None = None
    width: int | None = Field(default=None, ge=64, le=4096)
    height: int | None = Field(default=None, ge=64, le=4096)
    steps: int | None = Field(default=None, ge=1, le=200)

    @field_validator("lora", "cinematic", mode="before")
    @classmethod
    def _one(cls, value: Any) -> Any:
        return _as_choice(value)

    @field_validator("characters", mode="before")
    @classmethod
    def _many(cls, value: Any) -> Any:
        return [_as_choice(item) for item in value] if isinstance(value, list) else value


class LoraStackNode(_Table):
    """A stack node in the workflow to fill instead of inserting ``LoraLoader`` nodes.

    ``{i}`` in the input names is the slot number from 1. Unused slots get ``empty``.
    """

    node: str
    slots: int = Field(default=3, ge=1, le=10)
    name_input: str = "lora_name_{i}"
    strength_input: str = "strength_{i}"
    clip_strength_input: str | None = None
    count_input: str | None = None
    empty: str = "None"


class WorkflowSpec(_Table):
    """``[generators.<name>.workflows.<workflow>]``: one exported API-format file and its mapping."""

    file: str = Field(min_length=1)
    # Request field -> "<node>.inputs.<input>" (or a list of them); reference_images is a list
    # whose i-th entry takes the i-th reference image.
    inputs: dict[str, str | list[str]] = Field(default_factory=dict)
    # Node ids whose images are the result; empty: every SaveImage / PreviewImage node.
    outputs: list[str] = Field(default_factory=list)
    # Values for placeholders a request leaves out (e.g. steps = 30).
    defaults: dict[str, int | float | str] = Field(default_factory=dict)
    # Where LoRAs are inserted, as "<node>.<output index>"; found automatically when the graph
    # has one model loader and one text-encoder loader.
    lora_model_source: str | None = Field(default=None, pattern=r"^[^.\s]+\.[0-9]+$")
    lora_clip_source: str | None = Field(default=None, pattern=r"^[^.\s]+\.[0-9]+$")
    lora_stack_node: LoraStackNode | None = None

    @field_validator("inputs")
    @classmethod
    def _known_fields(cls, value: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        unknown = sorted(set(value) - ALL_FIELDS)
        if unknown:
            raise ValueError(f"unknown request field(s) {', '.join(unknown)}; known: {', '.join(sorted(ALL_FIELDS))}")
        return value
