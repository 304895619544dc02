"""``WorkflowGeneratorConfig``: the fields every workflow strategy's table has (comfyui, runpod)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator

from image_server.generators.base import GeneratorConfig
from image_server.generators.workflow.compiled import CompiledWorkflow, compile_workflow
from image_server.generators.workflow.settings import StyleConfig, WorkflowSpec


class WorkflowGeneratorConfig(GeneratorConfig):
    """Workflows (exported API-format files and their mappings), the default one, and styles.

    A request picks another of the configured workflows with ``generator_config = {"workflow":
    "<name>"}``; each workflow file is loaded and checked against its mapping here, when the
    config is validated, so a bad mapping stops the service at start-up.
    """

    OVERRIDABLE: ClassVar[frozenset[str]] = frozenset({"workflow"})

    workflows_dir: Path = Path("workflows")
    workflows: dict[str, WorkflowSpec] = Field(min_length=1)
    workflow: str | None = None  # the default; None: the only (or first) one in ``workflows``
    styles: dict[str, StyleConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _compile(self) -> WorkflowGeneratorConfig:
        if self.workflow is not None and self.workflow not in self.workflows:
            allowed = ", ".join(sorted(self.workflows))
            raise ValueError(f"unknown workflow {self.workflow!r}; allowed: {allowed}")
        for name in self.workflows:
            self.compiled(name)
        return self

    @property
    def workflow_name(self) -> str:
        return self.workflow or next(iter(self.workflows))

    def compiled(self, name: str | None = None) -> CompiledWorkflow:
        """The checked workflow. Files are read once per process (at start-up, when the config is
        validated): an edited workflow file takes effect on restart, after the same checks."""
        name = name or self.workflow_name
        return _compile_cached(str(self.workflows_dir), name, self.workflows[name].model_dump_json())


@lru_cache(maxsize=256)
def _compile_cached(directory: str, name: str, spec_json: str) -> CompiledWorkflow:
    return compile_workflow(Path(directory), name, WorkflowSpec.model_validate_json(spec_json))
