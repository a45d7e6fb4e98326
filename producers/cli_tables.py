"""``loquetier jobs|requests|adapters``: status tables straight from Postgres."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select

from loquetier.db.models import AdapterRow, JobRow, RequestRow
from loquetier.db.session import create_engine, session_factory
from loquetier.settings import get_settings

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
    for name in TABLES:
        p = subparsers.add_parser(name, help=f"the latest {name} (from Postgres)")
        p.add_argument("--status", default=None)
        p.add_argument("--limit", type=int, default=20)
        p.set_defaults(func=_show, table=name)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if hasattr(value, "strftime"):
        return str(value.strftime("%Y-%m-%d %H:%M:%S"))
    return str(value)


def render(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


async def fetch(
    url: str, table: str, *, status: str | None = None, limit: int = 20
) -> tuple[list[str], list[Any]]:
    model, columns, order = TABLES[table]
    engine = create_engine(url)
    try:
        async with session_factory(engine)() as session:
            query = select(*(getattr(model, c) for c in columns)).order_by(order.desc()).limit(limit)
            if status is not None:
                query = query.where(model.status == status)
            return columns, [tuple(r) for r in (await session.execute(query)).all()]
    finally:
        await engine.dispose()


def _show(args: argparse.Namespace) -> int:
    url = get_settings().database.url
    if url is None:
        raise SystemExit("no database: set LOQUETIER_DATABASE__URL (or run `loquetier up`)")
    columns, rows = asyncio.run(fetch(url, args.table, status=args.status, limit=args.limit))
    print(render(columns, rows))
    return 0
