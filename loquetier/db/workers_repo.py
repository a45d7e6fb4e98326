"""Worker rows: register on start, heartbeat while alive, mark stopped on exit.

Functions run in the caller's transaction and never commit.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from loquetier.db.models import WorkerRow


async def upsert_worker(
    session: AsyncSession,
    *,
    worker_id: str,
    host: str,
    pid: int,
    device: str,
    capacity: dict[str, Any] | None = None,
    status: str = "running",
) -> None:
    """Register (or re-register after a restart) a worker."""
    values = {
        "worker_id": worker_id,
        "host": host,
        "pid": pid,
        "device": device,
        "capacity": capacity or {},
        "status": status,
    }
    stmt = insert(WorkerRow).values(**values)
    fresh = {k: stmt.excluded[k] for k in ("host", "pid", "device", "capacity", "status")}
    stmt = stmt.on_conflict_do_update(
        index_elements=[WorkerRow.worker_id],
        set_=fresh | {"heartbeat_at": func.now(), "started_at": func.now(), "stopped_at": None},
    )
    await session.execute(stmt)


async def heartbeat_worker(session: AsyncSession, worker_id: str, *, status: str | None = None) -> bool:
    """Refresh ``heartbeat_at`` (and optionally the status; ``stopped`` sets ``stopped_at``)."""
    values: dict[str, Any] = {"heartbeat_at": func.now()}
    if status is not None:
        values["status"] = status
        if status == "stopped":
            values["stopped_at"] = func.now()
    stmt = update(WorkerRow).where(WorkerRow.worker_id == worker_id).values(**values)
    stmt = stmt.returning(WorkerRow.worker_id)
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def count_live_workers(session: AsyncSession, *, within_s: float) -> int:
    """Workers that are running (not draining or stopped) and heartbeat within ``within_s`` seconds."""
    count = await session.scalar(
        select(func.count()).where(
            WorkerRow.status.in_(("starting", "running")),
            WorkerRow.heartbeat_at > func.now() - func.make_interval(0, 0, 0, 0, 0, 0, within_s),
        )
    )
    return int(count or 0)


async def worker_status(session: AsyncSession, worker_id: str) -> str | None:
    status: str | None = await session.scalar(select(WorkerRow.status).where(WorkerRow.worker_id == worker_id))
    return status


async def worker_is_alive(session: AsyncSession, worker_id: str, *, within_s: float) -> bool:
    """Did ``worker_id`` heartbeat within ``within_s`` seconds (database clock)?"""
    beat: datetime | None = await session.scalar(
        select(WorkerRow.heartbeat_at).where(
            WorkerRow.worker_id == worker_id,
            WorkerRow.status.in_(("starting", "running", "draining")),
            WorkerRow.heartbeat_at > func.now() - func.make_interval(0, 0, 0, 0, 0, 0, within_s),
        )
    )
    return beat is not None


async def drain_workers(session: AsyncSession, target: str) -> list[str]:
    """Mark ``target`` (a worker_id, or "*" for all live ones) as draining."""
    stmt = update(WorkerRow).where(WorkerRow.status.in_(("starting", "running"))).values(status="draining")
    if target != "*":
        stmt = stmt.where(WorkerRow.worker_id == target)
    return list((await session.scalars(stmt.returning(WorkerRow.worker_id))).all())
