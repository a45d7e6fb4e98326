"""The product's import graph, read from the source with ``ast`` (nothing is imported).

Modules are named as installed: ``loquetier/...`` as ``loquetier.*`` and the user's top-level
folders under the namespace they are mapped to (``kernels/`` → ``loquetier.kernels``, ...).
Every import counts, wherever it sits: at module level, inside a function (a lazy import is
still a dependency), under ``if TYPE_CHECKING:`` (a type is part of a module's contract), and
``importlib.import_module("a.b")`` / ``__import__("a.b")`` with a constant name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# folder on disk -> package name once installed (pyproject's package-dir)
PRODUCT_FOLDERS = {
    "loquetier": "loquetier",
    "kernels": "loquetier.kernels",
    "workers": "loquetier.workers",
    "producers": "loquetier.producers",
}
# symlinks into the namespace for editable use; the real folders are read instead
_LINKED = {"kernels", "workers", "producers", "migrations", "data"}


@dataclass(frozen=True)
class Import:
    """One imported name: the module it comes from and the line that imports it."""

    target: str  # dotted name as written (resolved if relative), e.g. "sqlalchemy.orm"
    line: int
    names: tuple[str, ...] = ()  # the names of a ``from x import a, b``


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: list[Import] = field(default_factory=list)
    tree: ast.Module | None = None


def _module_files() -> Iterator[tuple[str, Path, bool]]:
    for folder, package in PRODUCT_FOLDERS.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base)
            if folder == "loquetier" and rel.parts[0] in _LINKED:
                continue
            if "__pycache__" in rel.parts:
                continue
            parts = list(rel.with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            yield ".".join([package, *parts]), path, is_package


def _resolve_relative(module: Module, level: int, name: str | None) -> str:
    base = module.name.split(".")
    if not module.is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _imports_of(module: Module) -> list[Import]:
    assert module.tree is not None
    found: list[Import] = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_relative(module, node.level, node.module) if node.level else node.module or ""
            found.append(Import(target, node.lineno, tuple(alias.name for alias in node.names)))
        elif isinstance(node, ast.Call) and _is_import_call(node.func) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append(Import(arg.value, node.lineno))
    return found


def _is_import_call(func: ast.expr) -> bool:
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module"
    return isinstance(func, ast.Name) and func.id in ("import_module", "__import__")


def load_modules() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for name, path, is_package in _module_files():
        module = Module(name, path, is_package)
        module.tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        module.imports = _imports_of(module)
        modules[name] = module
    return modules


def top_level(target: str) -> str:
    return target.split(".", maxsplit=1)[0]


def internal_edges(modules: dict[str, Module]) -> dict[str, set[str]]:
    """module -> the product modules it imports.

    ``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg``.
    """
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for module in modules.values():
        for imp in module.imports:
            targets = [f"{imp.target}.{n}" for n in imp.names if f"{imp.target}.{n}" in modules]
            if len(targets) < len(imp.names) or not imp.names:
                # some names are attributes of the module itself (or `import a.b`)
                target = imp.target
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target:
                    targets.append(target)
            edges[module.name].update(t for t in targets if t != module.name)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0

    def visit(root: str) -> None:
        nonlocal counter
        # iterative DFS: (node, iterator over its successors)
        work: list[tuple[str, Iterator[str]]] = []

        def push(node: str) -> None:
            nonlocal counter
            index[node] = low[node] = counter
            counter += 1
            stack.append(node)
            on_stack.add(node)
            work.append((node, iter(sorted(edges.get(node, ())))))

        push(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    push(succ)
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def one_cycle(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A concrete loop a -> b -> ... -> a inside a strongly connected component, for messages."""
    members = set(component)
    start = component[0]
    path = [start]
    seen = {start}
    node = start
    while True:
        succ = sorted(edges[node] & members)
        if start in succ and len(path) > 1:
            return [*path, start]
        nxt = next((s for s in succ if s not in seen), None)
        if nxt is None:
            nxt = succ[0]
            return [*path[path.index(nxt):], nxt] if nxt in path else [*path, nxt]
        path.append(nxt)
        seen.add(nxt)
        node = nxt
