"""The package's shape: nothing but code in chemlit/, and no import circles among its modules."""

from __future__ import annotations

import ast
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "chemlit"
# Files other than .py that chemlit needs at run time (none: results and pictures live in docs/).
RUNTIME_DATA: set[str] = set()


def test_package_holds_only_code():
    """Reports, tables and pictures belong in docs/, not in the installed package."""
    stray = []
    for root, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            relative = (Path(root) / name).relative_to(PACKAGE).as_posix()
            if not name.endswith(".py") and relative not in RUNTIME_DATA:
                stray.append(relative)
    assert not stray, f"chemlit/ should hold only .py files; move these out (to docs/): {sorted(stray)}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """chemlit module -> the chemlit modules it imports anywhere in its file (top level or inside functions)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..data import y
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the module pkg.sub when there is one, else a name of pkg
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                           for alias in node.names]
            for target in targets:
                while target and target not in files:  # `import chemlit.x.y as z` names the module itself
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_find_cycles_sees_a_circle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    """No chemlit module imports, even inside a function, a module that imports it back (directly or not)."""
    graph = import_graph()
    assert "chemlit.bench.report" in graph and "chemlit.cli" in graph  # the walk saw the package
    cycles = find_cycles(graph)
    detail = "\n".join(" <-> ".join(c) + ": " + "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(c)))}"
                                                          for m in c) for c in cycles)
    assert not cycles, f"import cycles among chemlit modules:\n{detail}"
    # a command's __main__ is an entry point only: what other modules share lives in modules of its own
    assert not {m: sorted(d for d in deps if d.endswith(".__main__")) for m, deps in graph.items()
                if any(d.endswith(".__main__") for d in deps)}
