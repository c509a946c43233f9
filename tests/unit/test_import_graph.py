"""The three packages' import graph has no circle (every import counts: top-level, lazy, TYPE_CHECKING).

A circle between the evaluation and the training loop once made eval impossible to read or
change alone; this reads each module's source and walks the graph, so a new circle fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "salt_cache", "salt_train")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for target in targets:
                if target in modules and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def only(graph: dict[str, set[str]], package: str) -> dict[str, set[str]]:
    keep = {m for m in graph if m.split(".")[0] == package}
    return {m: graph[m] & keep for m in keep}


def test_no_import_circle_in_any_package():
    """No package's modules import each other in a circle (the eval wing and the loop among them)."""
    graph = import_graph()
    assert "salt_train.eval.command" in graph and graph["salt_train.eval.quick"], "the graph read the eval wing"
    for package in PACKAGES:
        assert find_cycle(only(graph, package)) is None, " -> ".join(find_cycle(only(graph, package)) or [])


def test_training_reaches_eval_only_through_the_loop():
    """Only the loop (and the CLI) import the eval wing; nothing in the eval wing imports the loop."""
    graph = import_graph()
    importers = {
        m
        for m, targets in graph.items()
        if any(t.startswith("salt_train.eval") for t in targets) and not m.startswith("salt_train.eval")
    }
    assert importers <= {"salt_train.train", "salt_train.cli"}, importers
    for module, targets in graph.items():
        if module.startswith("salt_train.eval"):
            assert not targets & {"salt_train.train", "salt_train.metrics", "salt_train.batches"}, (module, targets)
