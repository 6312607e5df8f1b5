"""The package's import graph has no circles, and the layers point one way.

Every ``import searchrl...`` / ``from searchrl... import`` in ``src/searchrl`` counts, at module
level, inside a function (a lazy import is a circle all the same) or under
``if TYPE_CHECKING:`` (a circle for the type checker and the reader).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "searchrl"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """The searchrl modules ``tree`` imports (``from a import b``: ``a.b`` when it is a module)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("searchrl"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("searchrl"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    found.add(sub if sub in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {
        name: {m for m in _imports(ast.parse(path.read_text()), modules) if m != name}
        for name, path in files.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    graph = import_graph()
    assert "searchrl.rollout.engine.hf" in graph and graph["searchrl.rewards"]
    assert _cycles(graph) == []


def test_layers_point_one_way():
    graph = import_graph()
    engine = [m for m in graph if m.startswith("searchrl.rollout.engine")]
    for m in engine:  # the engine knows nothing of the agent (loop, parser, prompts, rewards)
        bad = {d for d in graph[m] if d.startswith("searchrl.") and not d.startswith(
            ("searchrl.rollout.engine", "searchrl.errors", "searchrl.models"))}
        assert not bad, (m, bad)
    for m in ("searchrl.types", "searchrl.tags", "searchrl.rewards"):  # records and grading
        assert not {d for d in graph[m] if d.startswith(("searchrl.rollout", "searchrl.training"))}
    # test-only random models stay out of production code
    assert not [m for m, deps in graph.items() if "searchrl.testing" in deps]
    # the protocol and the engine package import no backend (nor torch) when imported
    assert graph["searchrl.rollout.engine.protocol"] == set()
    assert graph["searchrl.rollout.engine"] == set()


@pytest.mark.parametrize("name", ["searchrl.types", "searchrl.rewards", "searchrl.rollout.loop",
                                  "searchrl.rollout.engine.factory", "searchrl.rollout.engine.hf"])
def test_modules_import_alone(name):
    """Each imports first in a fresh interpreter (an import circle breaks some orders)."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    subprocess.run([sys.executable, "-c", f"import {name}"], check=True, env=env, timeout=120)
