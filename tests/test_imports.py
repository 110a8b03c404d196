"""The package's modules import one another without a cycle.

Only module-level imports count (those run when a module is first imported; an import inside a function or
under `if TYPE_CHECKING:` runs later or never), read with `ast` so no module is executed. A cycle there makes
the import order matter: whichever module of the cycle is imported first sees the other half-initialised.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipelines"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run at import time: the module body and its if/try/with blocks, not functions or classes'
    methods, and not the `if TYPE_CHECKING:` branch."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += _module_level_imports(node.body)
            found += _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                found += _module_level_imports(block)
        elif isinstance(node, ast.With):
            found += _module_level_imports(node.body)
        elif isinstance(node, ast.ClassDef):  # a class body runs at import time too (its methods do not)
            found += _module_level_imports(node.body)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports at import time."""
    modules = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in _module_level_imports(ast.parse(path.read_text(encoding="utf-8"), str(path)).body):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:  # relative: from the module's package, one level up per extra dot
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    start = ".".join(base + ([node.module] if node.module else []))
                else:
                    start = node.module or ""
                # `from pkg import mod` imports the submodule pkg.mod where there is one, else a name of pkg
                targets = [f"{start}.{a.name}" if f"{start}.{a.name}" in modules else start for a in node.names]
            for target in targets:
                # `import a.b.c` runs a, a.b and a.b.c: the deepest module of ours it names, and the packages
                # above it, except those above this module: Python ran (or is running) them before it
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    deps.add(target)
                parent = target.rpartition(".")[0]
                while parent:
                    if not f"{name}.".startswith(f"{parent}."):
                        deps.add(parent)
                    parent = parent.rpartition(".")[0]
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40, sorted(graph)  # every module was found
    assert "pipelines.spool" in graph["pipelines.tracking"]  # and their imports read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in pipelines/: " + " -> ".join(cycle or [])


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "pipelines"


@pytest.mark.parametrize(("files", "expected"), [
    ({"pipelines/__init__.py": "", "pipelines/a.py": "from pipelines import b\n",
      "pipelines/b.py": "import pipelines.a\n"}, ["pipelines.a", "pipelines.b", "pipelines.a"]),
    ({"pipelines/__init__.py": "", "pipelines/s/__init__.py": "", "pipelines/s/x.py": "from . import y\n",
      "pipelines/s/y.py": "from ..s.x import f\n"}, ["pipelines.s.x", "pipelines.s.y", "pipelines.s.x"]),
])
def test_a_cycle_is_found_and_named(tmp_path, files, expected):
    graph = import_graph(_write(tmp_path, files))
    assert find_cycle(graph) == expected


def test_imports_inside_functions_and_type_checking_blocks_are_no_cycle(tmp_path):
    root = _write(tmp_path, {
        "pipelines/__init__.py": "",
        "pipelines/a.py": "from pipelines import b\n",
        "pipelines/b.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipelines import a\n"
                           "def f():\n    from pipelines.a import g\n"),
    })
    graph = import_graph(root)
    assert graph == {"pipelines": set(), "pipelines.a": {"pipelines.b"}, "pipelines.b": set()}
    assert find_cycle(graph) is None
