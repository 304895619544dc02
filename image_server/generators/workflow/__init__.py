"""ComfyUI API-format workflows shared by the comfyui and runpod strategies.

``config`` holds the generator-table fields (workflows, mapping, styles), ``compiled`` checks
a workflow file against its mapping at start-up, ``builder`` turns a request into the graph to
run, and ``lora_stack`` plans and wires the LoRA stack.
"""

from image_server.generators.workflow.builder import BuiltGraph, build_graph, workflow_capabilities
from image_server.generators.workflow.config import WorkflowGeneratorConfig
from image_server.generators.workflow.graph import Graph, WorkflowFileError

__all__ = [
    "BuiltGraph",
    "Graph",
    "WorkflowFileError",
    "WorkflowGeneratorConfig",
    "build_graph",
    "workflow_capabilities",
]
