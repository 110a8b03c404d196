"""What code a stage runs: the project modules its package imports, found by reading their import statements.

A stage's cache key must change when any line it runs changes, and stages run more than their own folder:
train calls evaluate's scoring, curate and ingest use crawl's schema, all of them use `storage` and
`models`. Reading the imports (`ast`, never executing anything) finds them, function-level imports
included, since the lazy imports that keep start-up light are still code the stage runs. Two things are
left out on purpose: imports under `if TYPE_CHECKING:` (never run), and the parent packages that Python
executes on the way to a submodule (`pipelines/stages/__init__.py` imports every stage to register it;
following it would tie every stage's key to every other stage's code). A package that is itself imported
(`from pipelines.stages.crawl import CrawlStage`) is followed like any module. JSON files beside a module
(open_clip model configs, schemas) are data that module reads, so they count too.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from pathlib import Path


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterable[str]:
    """Dotted names of the modules (or module.attribute) a file imports, relative ones made absolute."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base_parts = parts if is_package else parts[:-1]
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        stack.extend(ast.iter_child_nodes(node))


def _module_file(name: str, root: Path, package: str) -> Path | None:
    """The file of a dotted module name inside `package` (rooted at root/package), or None."""
    if name != package and not name.startswith(package + "."):
        return None
    rel = Path(*name.split("."))
    for candidate in (root / rel / "__init__.py", root / rel.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path, root: Path) -> str:
    if not path.is_relative_to(root):  # a plugin's file: its own relative imports are not followed
        return path.stem
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_closure(start: Iterable[Path], root: Path, package: str) -> list[Path]:
    """The start files and every file of `package` they import, directly or through each other, sorted."""
    seen: set[Path] = set()
    todo = [Path(p).resolve() for p in start]
    root = root.resolve()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_bytes(), filename=str(path))
        name = _module_name(path, root)
        for imported in _imported_names(tree, name, path.name == "__init__.py"):
            target = _module_file(imported, root, package)
            if target is not None and target.resolve() not in seen:
                todo.append(target.resolve())
    return sorted(seen)


def digest_name(f: Path, root: Path, package: str = "pipelines") -> str:
    """The name a file is digested under: its path from root for the project's package; for anything else (a
    plugin's module, wherever this machine installed it, a venv inside the repo included) its folder and name."""
    f = f.resolve()
    if f.is_relative_to(root.resolve() / package):
        return str(f.relative_to(root.resolve()))
    return str(Path("<plugin>", f.parent.name, f.name))


def digest_files(files: Iterable[Path], root: Path) -> str:
    """sha256 over each file's name (`digest_name`) and bytes, and the JSON data files beside them, in name order:
    the same code gives the same digest on every machine."""
    paths = set()
    for f in files:
        paths.add(f)
        paths.update(f.parent.glob("*.json"))
    h = hashlib.sha256()
    for name, f in sorted((digest_name(f, root), f) for f in paths):
        h.update(name.encode() + b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()
