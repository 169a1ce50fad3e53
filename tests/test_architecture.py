"""The package's layering (docs/architecture.md) stays true: no import cycle, and no module imports
one of a higher layer. Every import counts: at module level, inside functions, and under
``TYPE_CHECKING``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "src" / "steer"

LAYERS: list[tuple[str, ...]] = [
    ("steer.paths", "steer.knobs", "steer.distributed", "steer.allocator"),  # 0 foundation
    ("steer.algo", "steer.data", "steer.rewards", "steer.rollout", "steer.models",
     "steer.checkpointing", "steer.tracking"),                                # 1 the parts
    ("steer.config", "steer.module", "steer.observers", "steer.step_metrics", "steer.optimizer"),  # 2 the step
    ("steer.callbacks", "steer.eval", "steer.probe"),                         # 3 around the step
    ("steer.startup", "steer.app"),                                           # 4 assembly
    ("steer.cli",),                                                           # 5 the command line
]
"""Layer of each module, by prefix (the longest prefix decides); docs/architecture.md draws them."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere in its text (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for end in range(len(parts), 0, -1):  # the longest prefix that is one of our modules
                candidate = ".".join(parts[:end])
                if candidate in known:
                    if candidate != name and not name.startswith(candidate + "."):  # a package's own __init__
                        found.add(candidate)
                    break
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(path, name, set(modules)) for name, path in modules.items()}


def layer_of(name: str) -> int:
    matches = [(len(prefix), index) for index, prefixes in enumerate(LAYERS) for prefix in prefixes
               if name == prefix or name.startswith(prefix + ".")]
    if not matches:
        raise AssertionError(f"{name} is in no layer of tests/test_architecture.py (and docs/architecture.md): add it")
    return max(matches)[1]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert "steer.module" in graph and "steer.app" in graph
    assert "steer.module" in graph["steer.app"]  # app builds the module
    assert "steer.knobs" in graph["steer.startup"] or "steer.config" in graph["steer.startup"]


def test_cycles_are_found():
    """The detector itself: a made-up graph with a cycle through three modules, and one without."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_no_module_imports_a_higher_layer():
    upward = [f"{name} (layer {layer_of(name)}) imports {other} (layer {layer_of(other)})"
              for name, others in sorted(import_graph().items()) for other in sorted(others)
              if layer_of(other) > layer_of(name)]
    assert upward == []


@pytest.mark.parametrize("name", ["steer.knobs", "steer.paths"])
def test_the_foundation_imports_nothing_above_it(name):
    assert {layer_of(other) for other in import_graph()[name]} <= {0}
