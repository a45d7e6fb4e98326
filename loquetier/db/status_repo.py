"""Read-only status queries for the command line and the demo: live workers, recent rows of a
table, and the demo's plain-SQL view of the jobs (printed as it runs).

Functions take a session and run in the caller's transaction, except ``fetch_sql``, which opens
its own connection for one statement.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from loquetier.db.models import WorkerRow
from loquetier.db.session import create_engine

# The demo shows this statement to the user, then its result.
JOBS_SQL = """SELECT job_id, adapter_id, status, step, total_steps, round(last_loss::numeric, 4) AS last_loss,
       worker_id, round(extract(epoch FROM finished_at - started_at)::numeric, 1) AS seconds
FROM training_jobs ORDER BY created_at"""
RUNNING_WORKER_SQL = "SELECT 1 FROM workers WHERE status = 'running'"
READY_PIRATE_SQL = "SELECT 1 FROM adapters WHERE adapter_id = 'pirate' AND status = 'ready'"


async def live_worker_ids(session: AsyncSession, since: datetime) -> list[str]:
    """Workers that are serving and heartbeated at or after ``since``."""
    rows = await session.execute(
        select(WorkerRow.worker_id).where(WorkerRow.status == "running", WorkerRow.heartbeat_at >= since)
    )
    return [str(r[0]) for r in rows]


async def recent_rows(session: AsyncSession, model: Any, columns: Sequence[str], order: Any, *,
                      status: str | None = None, limit: int = 20) -> list[tuple[Any, ...]]:
    """``columns`` of ``model``'s newest rows by ``order`` (a column), optionally of one status."""
    statement = select(*(getattr(model, c) for c in columns)).order_by(order.desc()).limit(limit)
    if status is not None:
        statement = statement.where(model.status == status)
    return [tuple(r) for r in (await session.execute(statement)).all()]


async def fetch_sql(database_url: str, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Column names and rows of one plain SQL statement."""
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(text(sql))
            return list(result.keys()), [tuple(r) for r in result.fetchall()]
    finally:
        await engine.dispose()
