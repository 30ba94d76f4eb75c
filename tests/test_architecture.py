"""The package's structure: no import cycle between its modules (imports at module level, TYPE_CHECKING blocks
included, count; imports inside functions are deliberate and lazy)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "deltaedit"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports outside any function."""
    tree = ast.parse(path.read_text())
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.ImportFrom):
                base = package[: len(package) - child.level + 1] if child.level else []
                target = ".".join([*base, *(child.module.split(".") if child.module else [])])
                if target.startswith("deltaedit"):
                    found.add(target)
                    found.update(f"{target}.{alias.name}" for alias in child.names)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("deltaedit"))
            visit(child)

    visit(tree)
    return found


def import_graph() -> nx.DiGraph:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for target in top_level_imports(path):
            if target in modules and target != name:
                graph.add_edge(name, target)
    return graph


def test_no_import_cycle_between_the_packages_modules():
    graph = import_graph()
    assert graph.number_of_edges() > 20  # the graph was read
    # a package importing its own submodules (``methods`` -> ``methods.base``) is how packages work, and a
    # submodule naming its package in ``from . import x`` is not a cycle either; any other cycle is
    cycles = [c for c in nx.simple_cycles(graph) if not _package_and_own_submodule(c)]
    assert cycles == [], f"import cycles: {cycles}"


def _package_and_own_submodule(cycle: list[str]) -> bool:
    return len(cycle) == 2 and (cycle[0].startswith(cycle[1] + ".") or cycle[1].startswith(cycle[0] + "."))
