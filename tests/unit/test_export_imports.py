"""The shape of bigtx.export: its modules import each other without cycles, and only the layers below it.

Read from the source with ``ast`` (nothing is imported), so an import hidden inside a function counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import bigtx.export

PACKAGE = "bigtx.export"
# export depends on model, checkpoint and config only (and on the bigtx package itself, for its version)
ALLOWED = ("bigtx.config", "bigtx.model", "bigtx.checkpoint", PACKAGE)


def modules() -> dict[str, ast.Module]:
    folder = Path(bigtx.export.__file__).parent
    found = {}
    for file in sorted(folder.glob("*.py")):
        name = PACKAGE if file.stem == "__init__" else f"{PACKAGE}.{file.stem}"
        found[name] = ast.parse(file.read_text(), str(file))
    return found


def imported(module: str, tree: ast.Module, known: set[str]) -> list[tuple[str, ast.stmt]]:
    """``(bigtx module, statement)`` for every import of a bigtx module anywhere in ``tree``."""
    package = module if module == PACKAGE else module.rpartition(".")[0]
    out: list[tuple[str, ast.stmt]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            # `from bigtx.export import consolidate` imports the submodule, anything else the package itself
            out += [(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base, node) for a in node.names]
    return [(name, node) for name, node in out if name == "bigtx" or name.startswith("bigtx.")]


def graph() -> dict[str, set[str]]:
    trees = modules()
    return {name: {dep for dep, _ in imported(name, tree, set(trees)) if dep in trees} for name, tree in trees.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == "open":
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_reports_a_cycle_and_accepts_a_tree() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    # a submodule that imports the package closes a loop through __init__
    tree = ast.parse("def f():\n    from bigtx.export import open_source\n")
    assert [name for name, _ in imported(f"{PACKAGE}.x", tree, {PACKAGE, f"{PACKAGE}.x"})] == [PACKAGE]


def test_export_package_imports_are_acyclic() -> None:
    edges = graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle in bigtx.export: " + " -> ".join(cycle or [])
    assert edges[f"{PACKAGE}.types"] == set()  # the shared types are a leaf every other module may import


def test_export_imports_bigtx_only_at_module_level_and_only_from_lower_layers() -> None:
    hidden, foreign = [], []
    trees = modules()
    for name, tree in trees.items():
        top_level = {id(node) for node in tree.body}
        for dep, node in imported(name, tree, set(trees)):
            if id(node) not in top_level:
                hidden.append(f"{name}:{node.lineno} imports {dep} inside a function")
            if dep != "bigtx" and not any(dep == layer or dep.startswith(layer + ".") for layer in ALLOWED):
                foreign.append(f"{name}:{node.lineno} imports {dep}")
    assert not hidden, hidden
    assert not foreign, foreign
