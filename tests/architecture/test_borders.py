"""The borders between the product's parts, checked on the source (import_graph.py reads it with
``ast``; lazy, ``TYPE_CHECKING`` and ``importlib`` imports count).

- The engine side (``loquetier.engine``, ``loquetier.models``, ``loquetier.lora``,
  ``loquetier.kernels``) and everything it imports use no service library: it runs as a plain
  library (offline generation, training) and can move to its own process.
- SQL lives in ``loquetier.db`` only: no other module imports a database library or holds a
  statement.
- Kernel implementations are reached through the op layer only.
- A lower layer never reaches up: models and kernels import nothing of the engine, kernels
  nothing of the rest of the product.
"""

from __future__ import annotations

import ast
import re

from import_graph import Module, internal_edges, load_modules, top_level

ENGINE_SIDE = ("loquetier.engine", "loquetier.models", "loquetier.lora", "loquetier.kernels")
# Product modules outside the engine side that it may use: pure, no service library either.
SHARED_WITH_ENGINE = {"loquetier", "loquetier.chat"}
SERVICE_LIBRARIES = {
    "aiokafka", "kafka", "confluent_kafka", "sqlalchemy", "asyncpg", "psycopg", "psycopg2", "alembic",
    "pydantic", "pydantic_settings", "msgpack", "fastapi", "starlette", "uvicorn", "uvloop", "httptools",
    "httpx", "multipart", "prometheus_client", "orjson",
}
# The product's service-side modules (wire format, settings, database, I/O processes).
SERVICE_MODULES = ("loquetier.messages", "loquetier.codec", "loquetier.results", "loquetier.settings",
                   "loquetier.services", "loquetier.db", "loquetier.workers", "loquetier.producers",
                   "loquetier.gateway", "loquetier.migrations")

DATABASE_LIBRARIES = {"sqlalchemy", "asyncpg", "psycopg", "psycopg2", "alembic"}
SQL_STATEMENT = re.compile(r"\b(SELECT\s.+\sFROM|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|"
                           r"CREATE\s+(TABLE|INDEX)|ALTER\s+TABLE|DROP\s+TABLE)\b", re.DOTALL)

# Statements that are text for people, not queries the module runs.
SQL_IN_PROSE = {("loquetier.cli_stack", "Runs psql on LOQUETIER_DATABASE__URL")}  # `loquetier sql --help`

KERNELS = "loquetier.kernels"
# What code outside kernels/ may import of it: the op layer and the data it takes.
OP_LAYER = {KERNELS, f"{KERNELS}.ops", f"{KERNELS}.model_ops", f"{KERNELS}.meta", f"{KERNELS}.weights"}


def _within(name: str, packages: tuple[str, ...] | set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _engine_closure(modules: dict[str, Module]) -> set[str]:
    edges = internal_edges(modules)
    seen: set[str] = set()
    stack = [name for name in modules if _within(name, ENGINE_SIDE)]
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(edges[name])
    return seen


def test_the_engine_side_imports_no_service_library() -> None:
    modules = load_modules()
    reached = _engine_closure(modules)
    assert any(_within(n, ("loquetier.engine",)) for n in reached)
    outside = sorted(n for n in reached if not _within(n, ENGINE_SIDE) and n not in SHARED_WITH_ENGINE)
    assert not outside, f"the engine side reaches product modules outside it: {outside}"
    bad = [f"{name}:{imp.line} imports {imp.target}" for name in sorted(reached) for imp in modules[name].imports
           if top_level(imp.target) in SERVICE_LIBRARIES or _within(imp.target, SERVICE_MODULES)]
    assert not bad, "the engine side imports service code:\n" + "\n".join(bad)


def test_sql_lives_in_loquetier_db_only() -> None:
    bad: list[str] = []
    for name, module in sorted(load_modules().items()):
        if _within(name, ("loquetier.db",)):
            continue
        bad += [f"{name}:{imp.line} imports {imp.target}" for imp in module.imports
                if top_level(imp.target) in DATABASE_LIBRARIES]
        assert module.tree is not None
        bad += [f"{name}:{node.lineno} holds SQL: {node.value[:60]!r}" for node in ast.walk(module.tree)
                if isinstance(node, ast.Constant) and isinstance(node.value, str)
                and SQL_STATEMENT.search(node.value) and not _prose(name, node.value)]
    assert not bad, "database code outside loquetier/db:\n" + "\n".join(bad)


def _prose(module: str, text: str) -> bool:
    return any(module == m and text.startswith(start) for m, start in SQL_IN_PROSE)


def test_kernels_are_reached_through_the_op_layer_only() -> None:
    modules = load_modules()
    bad = []
    for name, module in sorted(modules.items()):
        if _within(name, (KERNELS,)):
            continue
        for imp in module.imports:
            # `from a import b` imports the module a.b when there is one, else a name of a
            targets = [f"{imp.target}.{n}" if f"{imp.target}.{n}" in modules else imp.target for n in imp.names]
            bad += [f"{name}:{imp.line} imports {target}" for target in targets or [imp.target]
                    if _within(target, (KERNELS,)) and target not in OP_LAYER]
    assert not bad, "kernel implementations imported past the op layer:\n" + "\n".join(bad)


def test_lower_layers_do_not_reach_up() -> None:
    edges = internal_edges(load_modules())
    bad = [f"{name} -> {target}" for name, targets in sorted(edges.items()) for target in sorted(targets)
           if (_within(name, ("loquetier.models", KERNELS)) and _within(target, ("loquetier.engine",)))
           or (_within(name, (KERNELS,)) and not _within(target, (KERNELS,)))]
    assert not bad, "a lower layer imports an upper one:\n" + "\n".join(bad)


def test_the_checks_see_what_they_look_for() -> None:
    """The detectors themselves, on made-up source: each border check fails where it should."""
    assert SQL_STATEMENT.search("SELECT 1 FROM workers WHERE status = 'running'")
    assert SQL_STATEMENT.search("insert into x values (1)") is None  # lower case: prose, not caught
    assert not SQL_STATEMENT.search("the job is selected from the queue")
    module = Module("loquetier.models.x", ROOT_PLACEHOLDER, False)
    module.tree = ast.parse("import importlib\ndef f():\n    importlib.import_module('loquetier.kernels.fused')\n"
                            "    from sqlalchemy import select\n")
    from import_graph import _imports_of

    targets = {i.target for i in _imports_of(module)}
    assert {"loquetier.kernels.fused", "sqlalchemy", "importlib"} <= targets


ROOT_PLACEHOLDER = __import__("pathlib").Path("x.py")
