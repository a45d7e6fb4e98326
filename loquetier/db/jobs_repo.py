"""Training job rows: idempotent insert, leased claim (SKIP LOCKED), progress, finish.

A job is owned by the worker named in ``worker_id`` while ``lease_expires_at`` is in the
future. Owners renew the lease with every heartbeat or progress update; a job whose lease
ran out is claimable again and resumes from its latest checkpoint. Functions run in the
caller's transaction and never commit.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, case, func, or_, select, update
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncSession

from loquetier.db.models import JobRow

FINAL_JOB_STATUSES = ("succeeded", "failed", "cancelled")


def _lease(lease_s: float) -> ColumnElement[Any]:
    return func.now() + timedelta(seconds=lease_s)


def _claimable() -> ColumnElement[bool]:
    return or_(
        JobRow.status == "queued",
        and_(JobRow.status == "running", JobRow.lease_expires_at < func.now()),
    )


def _owned(job_id: str, worker_id: str) -> ColumnElement[bool]:
    return and_(JobRow.job_id == job_id, JobRow.worker_id == worker_id, JobRow.status == "running")


async def insert_job_idempotent(
    session: AsyncSession,
    *,
    job_id: str,
    kind: str,
    adapter_id: str,
    spec: dict[str, Any],
    priority: int = 0,
    total_steps: int | None = None,
    tenant_id: str | None = None,
) -> bool:
    """Insert a queued job; ``True`` if new, ``False`` if ``job_id`` already exists."""
    stmt = (
        insert(JobRow)
        .values(
            job_id=job_id,
            kind=kind,
            adapter_id=adapter_id,
            spec=spec,
            priority=priority,
            total_steps=total_steps,
            tenant_id=tenant_id,
        )
        .on_conflict_do_nothing(index_elements=[JobRow.job_id])
        .returning(JobRow.job_id)
    )
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def claim_job(
    session: AsyncSession,
    worker_id: str,
    *,
    lease_s: float,
    job_id: str | None = None,
    kinds: tuple[str, ...] | None = None,
    max_attempts: int | None = None,
) -> JobRow | None:
    """Claim the best queued job, or a running one whose lease expired.

    Highest ``priority`` first, then oldest. Rows locked by another transaction are
    skipped, so concurrent workers get different jobs. Increments ``attempts``; rows that
    already have ``max_attempts`` are left to :func:`poison_jobs`.
    """
    query = select(JobRow.job_id).where(_claimable())
    if max_attempts is not None:
        query = query.where(JobRow.attempts < max_attempts)
    if job_id is not None:
        query = query.where(JobRow.job_id == job_id)
    if kinds is not None:
        query = query.where(JobRow.kind.in_(kinds))
    query = (
        query.order_by(JobRow.priority.desc(), JobRow.created_at, JobRow.job_id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    picked = await session.scalar(query)
    if picked is None:
        return None
    stmt = (
        update(JobRow)
        .where(JobRow.job_id == picked)
        .values(
            status="running",
            worker_id=worker_id,
            lease_expires_at=_lease(lease_s),
            heartbeat_at=func.now(),
            attempts=JobRow.attempts + 1,
            started_at=func.coalesce(JobRow.started_at, func.now()),
        )
        .returning(JobRow)
        .execution_options(populate_existing=True)
    )
    return (await session.execute(stmt)).scalar_one()


async def renew_lease(session: AsyncSession, job_id: str, worker_id: str, *, lease_s: float) -> bool:
    """Heartbeat: extend the lease. ``False`` means the job is no longer ours (stop work)."""
    stmt = (
        update(JobRow)
        .where(_owned(job_id, worker_id))
        .values(lease_expires_at=_lease(lease_s), heartbeat_at=func.now())
        .returning(JobRow.job_id)
    )
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def update_job_progress(
    session: AsyncSession,
    job_id: str,
    worker_id: str,
    *,
    lease_s: float,
    step: int,
    epoch: float | None = None,
    total_steps: int | None = None,
    last_loss: float | None = None,
    last_eval_loss: float | None = None,
    tokens_processed: int | None = None,
    metrics: dict[str, Any] | None = None,
) -> bool:
    """Store progress and renew the lease; ``False`` if the job is no longer ours.

    ``metrics`` is merged into the stored map (JSONB ``||``); ``None`` fields are kept.
    """
    values: dict[str, Any] = {
        "step": step,
        "lease_expires_at": _lease(lease_s),
        "heartbeat_at": func.now(),
    }
    optional = {
        "epoch": epoch,
        "total_steps": total_steps,
        "last_loss": last_loss,
        "last_eval_loss": last_eval_loss,
        "tokens_processed": tokens_processed,
    }
    values.update({k: v for k, v in optional.items() if v is not None})
    if metrics:
        values["metrics"] = JobRow.metrics.op("||")(bindparam("metrics_patch", metrics, type_=JSONB))
    stmt = update(JobRow).where(_owned(job_id, worker_id)).values(**values).returning(JobRow.job_id)
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def release_job(session: AsyncSession, job_id: str, worker_id: str, *, status: str = "queued") -> bool:
    """Give a job back (drain: ``queued``; pause: ``paused``) without finishing it.

    A clean hand-back is no failed attempt: ``attempts`` goes back down by the claim.
    """
    if status not in ("queued", "paused"):
        raise ValueError(f"release_job status must be 'queued' or 'paused', got {status!r}")
    stmt = (
        update(JobRow)
        .where(_owned(job_id, worker_id))
        .values(status=status, worker_id=None, lease_expires_at=None, attempts=func.greatest(JobRow.attempts - 1, 0))
        .returning(JobRow.job_id)
    )
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def expire_lease(session: AsyncSession, job_id: str, worker_id: str) -> bool:
    """End our lease now (the engine failed under the job): claimable at once, the claim still counted."""
    stmt = update(JobRow).where(_owned(job_id, worker_id)).values(lease_expires_at=func.now()).returning(JobRow.job_id)
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def pause_job(session: AsyncSession, job_id: str) -> bool:
    """Control "pause" of a queued or running job; a running one's claim is given back."""
    was_running = JobRow.status == "running"
    stmt = (
        update(JobRow)
        .where(JobRow.job_id == job_id, JobRow.status.in_(("queued", "running")))
        .values(
            status="paused",
            worker_id=None,
            lease_expires_at=None,
            attempts=case((was_running, func.greatest(JobRow.attempts - 1, 0)), else_=JobRow.attempts),
        )
        .returning(JobRow.job_id)
    )
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def poison_jobs(session: AsyncSession, *, max_attempts: int, error: str) -> list[JobRow]:
    """Fail every claimable job that was already claimed ``max_attempts`` times without
    ending (its workers crashed or stalled): it is never tried again."""
    stmt = (
        update(JobRow)
        .where(_claimable(), JobRow.attempts >= max_attempts)
        .values(status="failed", error=error, finished_at=func.now(), lease_expires_at=None)
        .returning(JobRow)
        .execution_options(populate_existing=True)
    )
    return list((await session.execute(stmt)).scalars().all())


async def finish_job(
    session: AsyncSession,
    job_id: str,
    *,
    status: str,
    worker_id: str | None = None,
    error: str | None = None,
) -> bool:
    """Final status (succeeded/failed/cancelled). With ``worker_id``, only if still ours."""
    if status not in FINAL_JOB_STATUSES:
        raise ValueError(f"finish_job status must be one of {FINAL_JOB_STATUSES}, got {status!r}")
    where = _owned(job_id, worker_id) if worker_id else JobRow.job_id == job_id
    stmt = (
        update(JobRow)
        .where(where, JobRow.status.not_in(FINAL_JOB_STATUSES))
        .values(status=status, error=error, finished_at=func.now(), lease_expires_at=None)
        .returning(JobRow.job_id)
    )
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def set_job_status(
    session: AsyncSession, job_id: str, status: str, *, from_statuses: tuple[str, ...]
) -> bool:
    """Control-plane transition (e.g. pause a queued job, resume a paused one)."""
    stmt = (
        update(JobRow)
        .where(JobRow.job_id == job_id, JobRow.status.in_(from_statuses))
        .values(status=status)
        .returning(JobRow.job_id)
    )
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def get_job(session: AsyncSession, job_id: str) -> JobRow | None:
    return await session.scalar(select(JobRow).where(JobRow.job_id == job_id))
