"""ComfyUI API-format graphs: loading exported files, addressing node inputs, links, placeholders.

An API-format graph ("Export (API)" in ComfyUI) is a JSON object keyed by node id:
``{"3": {"class_type": "KSampler", "inputs": {"seed": 1, "model": ["4", 0]}}}``. A list
``[node_id, output_index]`` as an input value is a link to another node's output.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Graph = dict[str, dict[str, Any]]

TARGET = re.compile(r"^(?P<node>[^.\s]+)\.inputs\.(?P<input>[^.\s]+)$")
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class WorkflowFileError(ValueError):
    """A workflow file that cannot be used; the message names the file (and node, input)."""


@dataclass(frozen=True)
class InputRef:
    """One input of one node, written ``<node>.inputs.<input>`` in config."""

    node: str
    input: str

    def __str__(self) -> str:
        return f"{self.node}.inputs.{self.input}"

    @classmethod
    def parse(cls, text: str) -> InputRef:
        match = TARGET.match(text.strip())
        if match is None:
            raise WorkflowFileError(f"{text!r} is not a node input; write it as '<node id>.inputs.<input name>'")
        return cls(match["node"], match["input"])


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def read_graph_text(path: Path) -> str:
    """The text of an API-format workflow file, checked for shape (blocking: start-up only)."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkflowFileError(f"workflow file {path} cannot be read: {exc}") from exc
    except ValueError as exc:
        raise WorkflowFileError(f"workflow file {path} is not valid JSON: {exc}") from exc
    check_api_format(data, source=str(path))
    return text


def check_api_format(data: Any, *, source: str) -> None:
    """Refuse anything but an API-format graph, with a hint for the UI-format export."""
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise WorkflowFileError(
            f"workflow file {source} is in ComfyUI's UI format; export it with 'Export (API)' "
            "(enable Dev mode options in the settings on older versions)"
        )
    if not isinstance(data, dict) or not data:
        raise WorkflowFileError(f"workflow file {source} is not an API-format graph (a JSON object of nodes)")
    for node_id, node in data.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise WorkflowFileError(f"workflow file {source}: node {node_id} has no class_type")
        if not isinstance(node.get("inputs", {}), dict):
            raise WorkflowFileError(f"workflow file {source}: node {node_id} has inputs that are not an object")


def check_target(graph: Graph, ref: InputRef, *, source: str, what: str) -> None:
    """A config error naming file, node and input when ``ref`` is not in ``graph``."""
    node = graph.get(ref.node)
    if node is None:
        raise WorkflowFileError(f"{source}: {what} names node {ref.node}, which the workflow does not have")
    inputs = node.get("inputs", {})
    if ref.input not in inputs:
        known = ", ".join(sorted(inputs)) or "none"
        raise WorkflowFileError(
            f"{source}: {what} names input {ref.input!r} of node {ref.node} ({node['class_type']}), "
            f"which it does not have (its inputs: {known})"
        )


def find_placeholders(graph: Graph) -> dict[str, list[InputRef]]:
    """``{{name}}`` placeholders in string inputs: name -> the inputs holding it."""
    found: dict[str, list[InputRef]] = {}
    for node_id, node in graph.items():
        for name, value in node.get("inputs", {}).items():
            if isinstance(value, str):
                for match in PLACEHOLDER.finditer(value):
                    found.setdefault(match[1], []).append(InputRef(node_id, name))
    return found


def set_input(graph: Graph, ref: InputRef, value: Any) -> None:
    graph[ref.node]["inputs"][ref.input] = value


def fill_placeholder(graph: Graph, ref: InputRef, name: str, value: Any) -> None:
    """Replace ``{{name}}`` in one input: a whole-string placeholder takes the value's own type."""
    current = graph[ref.node]["inputs"][ref.input]
    if not isinstance(current, str):
        return
    if (whole := PLACEHOLDER.fullmatch(current.strip())) and whole[1] == name:
        set_input(graph, ref, value)
        return
    text = PLACEHOLDER.sub(lambda m: str(value) if m[1] == name else m[0], current)
    set_input(graph, ref, text)


def next_node_id(graph: Graph) -> int:
    """The smallest integer id above every numeric id (exported ids are numbers as strings)."""
    numbers = [int(node_id) for node_id in graph if node_id.isdigit()]
    return max(numbers, default=0) + 1
