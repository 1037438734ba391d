"""The import graph: layers import only downwards, and no module imports itself back.

Layers, lowest first (docs/design.md): ``hgrn_jax.ops``, ``hgrn_jax.sharding`` and
``hgrn_jax.deprecation``; ``hgrn_jax.nn`` and ``hgrn_jax.data``; ``hgrn_jax.tasks`` (and
``hgrn_jax.convert``); ``hgrn_jax.training``; ``experiments``. Every import counts, including
those inside functions (a lazy import is still a dependency). Read from the source with ``ast``,
so nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("hgrn_jax", "experiments")

# (prefix, rank): a module may import modules of the same or a lower rank only.
LAYERS = (
    ("hgrn_jax.ops", 0),
    ("hgrn_jax.sharding", 0),
    ("hgrn_jax.deprecation", 0),  # the warning category every layer may use
    ("hgrn_jax.nn", 1),
    ("hgrn_jax.data", 1),
    ("hgrn_jax.convert", 2),
    ("hgrn_jax.tasks", 2),
    ("hgrn_jax.training", 3),
    ("hgrn_jax", 3),  # the package's __init__
    ("experiments", 4),
)
# Cycles that other branches remove (the ops and nn rework); the lead empties this after merging.
KNOWN_CYCLES: set[frozenset[str]] = set()  # none: keep it that way


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that ``name`` imports (``from a import b`` counts ``a.b`` when that
    is a module, else ``a``)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1]
                    + ([base] if base else [])
                )
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _rank(module: str) -> int:
    return next(
        rank for prefix, rank in LAYERS if module == prefix or module.startswith(prefix + ".")
    )


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_layers_import_only_downwards():
    graph = _graph()
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if _rank(target) > _rank(module)
    )
    assert not upward, "imports into a higher layer:\n" + "\n".join(upward)


@pytest.mark.parametrize("layer", ["hgrn_jax.data", "hgrn_jax.nn", "hgrn_jax.ops"])
def test_lower_layers_know_nothing_of_tasks_training_or_experiments(layer):
    forbidden = ("hgrn_jax.tasks", "hgrn_jax.training", "experiments")
    graph = _graph()
    bad = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.startswith(layer)
        for target in targets
        if target.startswith(forbidden)
    )
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    cycles = [c for c in _cycles(_graph()) if frozenset(c) not in KNOWN_CYCLES]
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def test_the_checks_see_a_cycle_and_an_upward_import():
    """The graph reader finds what the tests above forbid (so they can fail)."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [{"a", "b", "c"}]
    data = _graph()["hgrn_jax.data.listops_release"]
    assert "hgrn_jax.data.listops" in data and "hgrn_jax.data.errors" in data
    assert "hgrn_jax.tasks.array_task" in _graph()["hgrn_jax.tasks.listops"]
    assert _rank("hgrn_jax.tasks.listops") > _rank("hgrn_jax.data.listops")
