"""The import graph of a package, read from its source (nothing is imported or run).

Every `import` and `from ... import` counts wherever it stands: at the top, inside a function
(the lazy imports of the CLI) or under `if TYPE_CHECKING:` (mypy follows those too, and a
cycle that only typing needs is still two modules that cannot be understood one at a time).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

Graph = dict[str, set[str]]


def modules(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> its file, for every .py below `package_dir` (a package)."""
    root = package_dir.parent
    out: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(name: str, files: Mapping[str, Path]) -> bool:
    return name in files and files[name].name == "__init__.py"


def _imported(name: str, tree: ast.AST, files: Mapping[str, Path]) -> Iterator[str]:
    """The package modules that the module `name` (whose syntax tree is `tree`) imports."""
    package = name if _is_package(name, files) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _known(alias.name, files)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: -(node.level - 1)]
                base = ".".join(base_parts)
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in files:
                    yield sub  # `from . import catalog`: the submodule
                else:
                    yield from _known(target, files)


def _known(dotted: str, files: Mapping[str, Path]) -> Iterator[str]:
    """The longest prefix of `dotted` that is a module of the package, if any."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in files:
            yield candidate
            return


def graph(package_dir: Path) -> Graph:
    """Module -> the modules of the same package it imports (itself excluded)."""
    files = modules(package_dir)
    out: Graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        out[name] = {m for m in _imported(name, tree, files) if m != name}
    return out


def cycles(g: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, each sorted (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        # iterative depth-first search: (node, iterator over its successors)
        work: list[tuple[str, Iterator[str]]] = []

        def enter(n: str) -> None:
            nonlocal counter
            index[n] = low[n] = counter
            counter += 1
            stack.append(n)
            on_stack.add(n)
            work.append((n, iter(sorted(g.get(n, ())))))

        enter(v)
        while work:
            n, successors = work[-1]
            for w in successors:
                if w not in index:
                    enter(w)
                    break
                if w in on_stack:
                    low[n] = min(low[n], index[w])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[n])
                if low[n] == index[n]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == n:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(found)


def reachable(g: Mapping[str, Iterable[str]], start: Iterable[str]) -> dict[str, list[str]]:
    """Every module reachable from `start`, with one import path that reaches it."""
    paths: dict[str, list[str]] = {s: [s] for s in start}
    todo = list(paths)
    while todo:
        n = todo.pop()
        for w in sorted(g.get(n, ())):
            if w not in paths:
                paths[w] = [*paths[n], w]
                todo.append(w)
    return paths
