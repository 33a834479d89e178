"""The layout's two rules, checked on the source: imports only go down the floors
(library -> strategies -> simulations -> the ``fedke`` command), and no module imports itself
back through others (no import circle). Type-only imports (``if TYPE_CHECKING:``) do not count:
they never run."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"src/fedke": "fedke", "strategies": "fedke.strategies", "simulations": "fedke.simulations"}


def floor(module: str) -> int:
    if module == "fedke.simulations.cli":
        return 4
    if module.startswith("fedke.simulations"):
        return 3
    if module.startswith("fedke.strategies"):
        return 2
    return 1


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts))
            found[name] = path
    return found


def runtime_imports(tree: ast.AST):
    """Import nodes, leaving out the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
            else:
                candidates = [alias.name for alias in node.names]
            deps.update(c for c in candidates if c in known and c != name)
        graph[name] = deps
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, d) for m, deps in graph.items() for d in deps if floor(d) > floor(m))


def import_circles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Every path from a module back to itself (a depth-first walk from each module)."""
    circles = []
    for start in graph:
        stack, seen = [(start, (start,))], set()
        while stack:
            node, path = stack.pop()
            for dep in graph.get(node, ()):
                if dep == start:
                    circles.append(path)
                elif dep not in seen:
                    seen.add(dep)
                    stack.append((dep, (*path, dep)))
    return circles


def test_imports_only_go_down_the_floors():
    assert upward_imports(import_graph()) == []


def test_no_import_circle():
    assert import_circles(import_graph()) == []


def test_the_checks_catch_a_circle_an_upward_import_and_skip_type_only_imports():
    made_up = {"fedke.merge": {"fedke.strategies.base"}, "fedke.strategies.base": {"fedke.merge"},
               "fedke.simulations.wiring": {"fedke.merge"}}
    assert upward_imports(made_up) == [("fedke.merge", "fedke.strategies.base")]
    assert sorted(import_circles(made_up)) == [("fedke.merge", "fedke.strategies.base"),
                                               ("fedke.strategies.base", "fedke.merge")]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .base import X\nfrom .replies import Y\n")
    assert {node.module for node in runtime_imports(tree) if isinstance(node, ast.ImportFrom)} == {"typing", "replies"}
