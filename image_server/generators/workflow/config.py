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
        """The checked workflow (cached per file version and mapping)."""
        name = name or self.workflow_name
        spec = self.workflows[name]
        path = self.workflows_dir / spec.file
        try:
            stat = path.stat()
            version = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            version = (0, 0)  # compile_workflow reports the unreadable file
        return _compile_cached(str(self.workflows_dir), name, spec.model_dump_json(), version)


@lru_cache(maxsize=64)
def _compile_cached(directory: str, name: str, spec_json: str, version: tuple[int, int]) -> CompiledWorkflow:
    return compile_workflow(Path(directory), name, WorkflowSpec.model_validate_json(spec_json))
