"""``loquetier jobs|requests|adapters``: status tables straight from Postgres, numbers made readable."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from typing import Any

from loquetier.cli_errors import UserError
from loquetier.db.models import AdapterRow, JobRow, RequestRow

TABLES: dict[str, tuple[Any, list[str], Any]] = {
    "jobs": (
        JobRow,
        [
            "job_id",
            "kind",
            "adapter_id",
            "status",
            "step",
            "total_steps",
            "last_loss",
            "last_eval_loss",
            "worker_id",
            "attempts",
            "updated_at",
            "error",
        ],
        JobRow.created_at,
    ),
    "requests": (
        RequestRow,
        [
            "request_id",
            "adapter_id",
            "status",
            "prompt_tokens",
            "completion_tokens",
            "queued_ms",
            "ttft_ms",
            "tpot_ms",
            "worker_id",
            "finished_at",
            "error",
        ],
        RequestRow.created_at,
    ),
    "adapters": (
        AdapterRow,
        [
            "adapter_id",
            "version",
            "status",
            "rank",
            "alpha",
            "source_kind",
            "source",
            "size_bytes",
            "created_at",
        ],
        AdapterRow.created_at,
    ),
}


def register(subparsers: Any) -> None:
    from . import cli_control

    for name in TABLES:
        p = subparsers.add_parser(name, help=HELP[name], description=HELP[name])
        p.add_argument("--status", default=None, help="only rows with this status")
        p.add_argument("--limit", type=int, default=20, help="newest rows shown (default 20)")
        p.set_defaults(func=_show, table=name)
        if name in cli_control.ACTIONS:
            actions = cli_control.register(name, p)
            if name == "jobs":
                events = actions.add_parser("events", help="a job's history: status changes, checkpoints, metrics "
                                                           "(oldest first)")
                events.add_argument("job_id")
                events.add_argument("--limit", type=int, default=50, help="newest entries shown (default 50)")
                events.set_defaults(func=_events)


HELP = {
    "jobs": "the latest training jobs (from PostgreSQL); also: jobs cancel|pause|resume|events JOB_ID",
    "requests": "the latest inference requests (from PostgreSQL)",
    "adapters": "the adapters (from PostgreSQL); also: adapters load|unload|export",
}
MAX_CELL_CHARS = 60  # a long error message is cut in the table; `loquetier sql` shows it whole
_BYTES_COLUMNS = frozenset({"size_bytes"})
_MS_COLUMNS = frozenset({"queued_ms", "ttft_ms", "tpot_ms"})


def _cell(value: Any, column: str = "", *, cut: bool = True) -> str:
    if value is None:
        return "-"
    if column in _BYTES_COLUMNS and isinstance(value, int):
        return human_bytes(value)
    if isinstance(value, float):
        if column in _MS_COLUMNS or abs(value) >= 1000:
            return f"{value:,.1f}"  # 21,770.3 ms, never 2.177e+04
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if hasattr(value, "strftime"):
        return str(value.strftime("%Y-%m-%d %H:%M:%S"))
    text = " ".join(str(value).split())
    return text if not cut or len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 1] + "…"


def human_bytes(num: int) -> str:
    size = float(num)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{num} B"


def render(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, uncut: frozenset[str] = frozenset()) -> str:
    """A plain-text table; long text is cut to ``MAX_CELL_CHARS`` but in the ``uncut`` columns."""
    cells = [[_cell(v, c, cut=c not in uncut) for v, c in zip(row, columns, strict=True)] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


async def fetch(
    url: str, table: str, *, status: str | None = None, limit: int = 20
) -> tuple[list[str], list[Any]]:
    from loquetier.db.status_repo import recent_rows

    from .cli_support import query

    model, columns, order = TABLES[table]
    rows = await query(url, lambda session: recent_rows(session, model, columns, order, status=status, limit=limit))
    return columns, list(rows)


def _show(args: argparse.Namespace) -> int:
    from .cli_support import database_url

    url = database_url()
    columns, rows = asyncio.run(fetch(url, args.table, status=args.status, limit=args.limit))
    print(render(columns, rows))
    if not rows:
        print(f"(no {args.table} yet)")
    return 0


EVENT_COLUMNS = ["created_at", "level", "kind", "worker_id", "message"]


def _events(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise UserError("--limit must be at least 1")
    from .cli_support import database_url

    rows = asyncio.run(job_events(database_url(), args.job_id, args.limit))
    print(render(EVENT_COLUMNS, [[getattr(e, c) for c in EVENT_COLUMNS] for e in reversed(rows)],
                 uncut=frozenset({"message"})))
    return 0


async def job_events(url: str, job_id: str, limit: int) -> list[Any]:
    """The newest ``limit`` entries of the job's history, newest first; a job that does not exist is an error."""
    from loquetier.db import repo

    from .cli_control import HINTS
    from .cli_support import query

    async def read(session: Any) -> list[Any] | None:
        if await repo.get_job(session, job_id) is None:
            return None
        return await repo.job_events(session, job_id, limit=limit)

    rows = await query(url, read)
    if rows is None:
        raise UserError(f"no job {job_id!r} in the database", HINTS["unknown_job"])
    return rows
