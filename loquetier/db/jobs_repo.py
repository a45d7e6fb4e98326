"""Training job rows: idempotent insert, leased claim (SKIP LOCKED), progress, finish.

A job is owned by the worker named in ``worker_id`` while ``lease_expires_at`` is in the
future. Owners renew the lease with every heartbeat or progress update; a job whose lease
ran out is claimable again and resumes from its latest checkpoint. Functions run in the
caller's transaction and never commit.

Every transition that happens writes its entry in the job's history (``job_events``) in the same
transaction, so the history holds exactly what the rows went through: a transition that does not
apply (a replayed finish, a pause of a finished job) writes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, case, exists, func, or_, select, update
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from loquetier.db.models import JobEventRow, JobRow

FINAL_JOB_STATUSES = ("succeeded", "failed", "cancelled")


def _lease(lease_s: float) -> ColumnElement[Any]:
    return func.now() + timedelta(seconds=lease_s)


def _claimable() -> ColumnElement[bool]:
    return or_(
        JobRow.status == "queued",
        and_(JobRow.status == "running", JobRow.lease_expires_at < func.now()),
    )


def _adapter_in_training() -> ColumnElement[bool]:
    """Another finetune of the row's adapter runs (on whichever worker, its lease valid or not): one
    adapter trains one job at a time, so that each version starts from the one before and requests
    meet the same adapter on every worker."""
    other = aliased(JobRow)
    return exists().where(other.adapter_id == JobRow.adapter_id, other.job_id != JobRow.job_id,
                          other.kind == "finetune", other.status == "running")


def _owned(job_id: str, worker_id: str) -> ColumnElement[bool]:
    return and_(JobRow.job_id == job_id, JobRow.worker_id == worker_id, JobRow.status == "running")


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as ``None``: JSON has no NaN or infinity, and
    PostgreSQL refuses a ``jsonb`` holding one, with the whole transaction (a diverged loss,
    an evaluation of nothing)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


async def record_job_event(  # noqa: PLR0913
    session: AsyncSession,
    job_id: str,
    kind: str,
    message: str,
    *,
    level: str = "info",
    step: int | None = None,
    data: dict[str, Any] | None = None,
    worker_id: str | None = None,
) -> None:
    """Add an entry to the job's history. With ``step`` (checkpoints, metrics) one entry per
    (kind, step): a checkpoint's is kept as first written, a metrics entry takes the newer values."""
    stmt = insert(JobEventRow).values(job_id=job_id, kind=kind, level=level, message=message, step=step,
                                      data=json_safe(data or {}), worker_id=worker_id)
    if step is not None:
        where = JobEventRow.step.is_not(None)
        target = [JobEventRow.job_id, JobEventRow.kind, JobEventRow.step]
        if kind == "metrics":
            stmt = stmt.on_conflict_do_update(index_elements=target, index_where=where, set_={
                "message": stmt.excluded.message, "data": stmt.excluded.data,
                "worker_id": stmt.excluded.worker_id, "created_at": func.now()})
        else:
            stmt = stmt.on_conflict_do_nothing(index_elements=target, index_where=where)
    await session.execute(stmt)


async def record_owned_job_event(session: AsyncSession, job_id: str, worker_id: str, kind: str, message: str,
                                 *, data: dict[str, Any] | None = None) -> bool:
    """Add an entry to the history of a job that ``worker_id`` runs, checked under the job row's lock:
    False, and nothing written, when the job was cancelled, paused or taken over meanwhile (its
    history must not say that it goes on after it says that it stopped)."""
    owned = await session.scalar(select(JobRow.job_id).where(_owned(job_id, worker_id)).with_for_update())
    if owned is None:
        return False
    await record_job_event(session, job_id, kind, message, data=data, worker_id=worker_id)
    return True


def _job_noun(kind: str) -> str:
    return "evaluation" if kind == "evaluate" else "fine-tuning"


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
    if (await session.execute(stmt)).scalar_one_or_none() is None:
        return False
    await record_job_event(session, job_id, "created", f"Created {_job_noun(kind)} job {job_id}",
                           data={"adapter_id": adapter_id, "priority": priority})
    return True


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

    Highest ``priority`` first, then the job of the tenant with the fewest jobs running (one
    tenant's backlog does not hold another's first job behind it), then oldest. Rows locked by
    another transaction are skipped, so concurrent workers get different jobs. Increments
    ``attempts``; rows that already have ``max_attempts`` are left to :func:`poison_jobs`. A finetune waits, queued,
    while another finetune of its adapter runs (``_adapter_in_training``); two claims of two
    finetunes of one adapter serialize on the adapter's lock, and the second finds the first.
    """
    waits = and_(JobRow.kind == "finetune", _adapter_in_training())
    query = select(JobRow.job_id, JobRow.status, JobRow.worker_id, JobRow.kind, JobRow.adapter_id).where(
        _claimable(), ~waits)
    if max_attempts is not None:
        query = query.where(JobRow.attempts < max_attempts)
    if job_id is not None:
        query = query.where(JobRow.job_id == job_id)
    if kinds is not None:
        query = query.where(JobRow.kind.in_(kinds))
    mine = aliased(JobRow)  # jobs running for the same tenant (operators' jobs, tenant NULL, as one)
    running_of_tenant = (select(func.count()).select_from(mine)
                         .where(mine.status == "running", mine.tenant_id.is_not_distinct_from(JobRow.tenant_id))
                         .scalar_subquery())
    query = (
        query.order_by(JobRow.priority.desc(), running_of_tenant, JobRow.created_at, JobRow.job_id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    picked = (await session.execute(query)).first()
    if picked is None:
        return None
    if picked.kind == "finetune":
        lock = func.pg_advisory_xact_lock(func.hashtextextended("train:" + picked.adapter_id, 0))
        await session.execute(select(lock))
        if (await session.execute(select(waits).where(JobRow.job_id == picked.job_id))).scalar_one():
            return None  # a finetune of its adapter was claimed meanwhile: this one waits; the next claim goes on
    stmt = (
        update(JobRow)
        .where(JobRow.job_id == picked.job_id)
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
    row = (await session.execute(stmt)).scalar_one()
    data = {"attempt": row.attempts, "worker_id": worker_id}
    if picked.status == "running":  # its owner stopped renewing: the job goes on from its latest checkpoint
        await record_job_event(
            session, row.job_id, "started",
            f"Started again on worker {worker_id} (attempt {row.attempts}): "
            f"the lease of worker {picked.worker_id} expired", level="warn",
            data=data | {"previous_worker_id": picked.worker_id}, worker_id=worker_id)
    else:
        await record_job_event(session, row.job_id, "started",
                               f"Started on worker {worker_id} (attempt {row.attempts})", data=data,
                               worker_id=worker_id)
    return row


async def renew_lease(session: AsyncSession, job_id: str, worker_id: str, *, lease_s: float) -> bool:
    """Heartbeat: extend the lease. ``False`` means the job is no longer ours (stop work)."""
    stmt = (
        update(JobRow)
        .where(_owned(job_id, worker_id))
        .values(lease_expires_at=_lease(lease_s), heartbeat_at=func.now())
        .returning(JobRow.job_id)
    )
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def raise_job_step(session: AsyncSession, job_id: str, step: int) -> None:
    """The job's ``step`` becomes ``step`` where it shows less (a checkpoint stored past the last
    progress report: the row then shows the step the job resumes from)."""
    await session.execute(update(JobRow).where(JobRow.job_id == job_id, JobRow.step < step).values(step=step))


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

    ``metrics`` is merged into the stored map (JSONB ``||``); ``None`` fields are kept. The job's
    history gets a metrics entry for a report with ``metrics`` (an evaluation, the end), at the last
    step, or when it has none from the last ``METRICS_EVENT_EVERY_S``.
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
        values["metrics"] = JobRow.metrics.op("||")(bindparam("metrics_patch", json_safe(metrics), type_=JSONB))
    stmt = update(JobRow).where(_owned(job_id, worker_id)).values(**values).returning(
        JobRow.total_steps, JobRow.epoch, JobRow.last_loss, JobRow.last_eval_loss, JobRow.tokens_processed)
    row = (await session.execute(stmt)).first()
    if row is None:
        return False
    if step > 0 and (metrics or total_steps == step or not await _metrics_told_since(session, job_id)):
        data = {"step": step, "total_steps": row.total_steps, "epoch": row.epoch, "train_loss": row.last_loss,
                "eval_loss": row.last_eval_loss, "tokens_processed": row.tokens_processed}
        message = f"Step {step}/{row.total_steps or '?'}: training loss={_num(row.last_loss)}"
        if row.last_eval_loss is not None:
            message += f", eval loss={_num(row.last_eval_loss)}"
        await record_job_event(session, job_id, "metrics", message, step=step, data=data, worker_id=worker_id)
    return True


# A metrics entry in a job's history at most this often, besides those of an evaluation or the end, so
# that a long job's history is not thousands of loss readings (progress reports come every 2 s).
METRICS_EVENT_EVERY_S = 30.0


async def _metrics_told_since(session: AsyncSession, job_id: str) -> bool:
    since = func.now() - timedelta(seconds=METRICS_EVENT_EVERY_S)
    query = select(JobEventRow.id).where(JobEventRow.job_id == job_id, JobEventRow.kind == "metrics",
                                         JobEventRow.created_at > since).limit(1)
    return await session.scalar(query) is not None


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


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
    if (await session.execute(stmt)).scalar_one_or_none() is None:
        return False
    if status == "paused":
        await record_job_event(session, job_id, "paused", f"Paused; worker {worker_id} gave its claim back",
                               worker_id=worker_id)
    else:
        await record_job_event(session, job_id, "requeued",
                               f"Handed back by worker {worker_id}; queued for the next worker", worker_id=worker_id)
    return True


async def expire_lease(session: AsyncSession, job_id: str, worker_id: str) -> bool:
    """End our lease now (the engine failed under the job): claimable at once, the claim still counted."""
    stmt = update(JobRow).where(_owned(job_id, worker_id)).values(lease_expires_at=func.now()).returning(JobRow.job_id)
    if (await session.execute(stmt)).scalar_one_or_none() is None:
        return False
    await record_job_event(session, job_id, "lease_expired",
                           f"The engine failed under the job on worker {worker_id}; the next claim resumes it "
                           "from its latest checkpoint", level="warn", worker_id=worker_id)
    return True


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
    if (await session.execute(stmt)).scalar_one_or_none() is None:
        return False
    await record_job_event(session, job_id, "paused", "Paused")
    return True


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
    rows = list((await session.execute(stmt)).scalars().all())
    for row in rows:
        await record_job_event(session, row.job_id, "failed", _final_message(row, "failed", error), level="error")
    return rows


def _final_message(row: Any, status: str, error: str | None) -> str:
    if status == "cancelled":
        return "The job was cancelled"
    if status == "failed":
        return f"The job has failed: {(error or 'no reason given')[:500]}"
    if row.kind == "finetune":
        return f"The job has succeeded; new fine-tuned model: {row.adapter_id}"
    return "The job has succeeded"


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
        .returning(JobRow.kind, JobRow.adapter_id)
    )
    row = (await session.execute(stmt)).first()
    if row is None:
        return False
    await record_job_event(session, job_id, status, _final_message(row, status, error),
                           level="error" if status == "failed" else "info", worker_id=worker_id)
    return True


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
    if (await session.execute(stmt)).scalar_one_or_none() is None:
        return False
    if status == "queued" and from_statuses == ("paused",):
        await record_job_event(session, job_id, "resumed", "Resumed; queued for the next worker")
    else:
        await record_job_event(session, job_id, status, f"Status set to {status}")
    return True


async def job_events(session: AsyncSession, job_id: str, *, before_id: int | None = None,
                     limit: int = 20) -> list[JobEventRow]:
    """The job's history, newest first; ``before_id`` pages on from an entry."""
    query = select(JobEventRow).where(JobEventRow.job_id == job_id)
    if before_id is not None:
        query = query.where(JobEventRow.id < before_id)
    return list((await session.scalars(query.order_by(JobEventRow.id.desc()).limit(limit))).all())


async def get_job(session: AsyncSession, job_id: str) -> JobRow | None:
    return await session.scalar(select(JobRow).where(JobRow.job_id == job_id))


async def get_jobs(session: AsyncSession, job_ids: Collection[str]) -> dict[str, JobRow]:
    """The rows of those of ``job_ids`` that exist, by id (one query for many)."""
    rows = await session.scalars(select(JobRow).where(JobRow.job_id.in_(list(job_ids))))
    return {row.job_id: row for row in rows}
