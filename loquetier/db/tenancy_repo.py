"""What a tenant may see: adapters (its own and the shared ones), its jobs and their checkpoints.

``tenant_id`` None means an operator's view (shared rows only for adapters, every row for jobs
is not offered: the gateway always passes a tenant). Functions run in the caller's transaction.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, and_, func, or_, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import defer

from loquetier.db.jobs_repo import FINAL_JOB_STATUSES
from loquetier.db.models import AdapterRow, CheckpointRow, JobRow


def _adapter_visible(tenant_id: str | None) -> ColumnElement[bool]:
    shared = AdapterRow.tenant_id.is_(None)
    return shared if tenant_id is None else or_(shared, AdapterRow.tenant_id == tenant_id)


async def visible_adapters(
    session: AsyncSession, tenant_id: str | None
) -> list[tuple[str, datetime, str | None]]:
    """(adapter_id, created_at of its first version, owning tenant or None) of every ready adapter
    the tenant may use."""
    rows = await session.execute(
        select(AdapterRow.adapter_id, func.min(AdapterRow.created_at), func.max(AdapterRow.tenant_id))
        .where(AdapterRow.status == "ready", _adapter_visible(tenant_id))
        .group_by(AdapterRow.adapter_id)
        .order_by(AdapterRow.adapter_id)
    )
    return [(adapter_id, created, tenant) for adapter_id, created, tenant in rows.all()]


async def adapter_is_visible(session: AsyncSession, adapter_id: str, tenant_id: str | None) -> bool:
    """Does a ready version of ``adapter_id`` exist that ``tenant_id`` may use?"""
    found = await session.scalar(
        select(AdapterRow.version)
        .where(AdapterRow.adapter_id == adapter_id, AdapterRow.status == "ready", _adapter_visible(tenant_id))
        .limit(1)
    )
    return found is not None


async def adapter_owner(session: AsyncSession, adapter_id: str) -> tuple[bool, str | None]:
    """(exists, tenant_id of its latest version): any tenant's, for checks before a name is taken."""
    row = await session.execute(
        select(AdapterRow.tenant_id).where(AdapterRow.adapter_id == adapter_id).order_by(AdapterRow.version.desc())
    )
    first = row.first()
    return (False, None) if first is None else (True, first[0])


async def lock_tenant(session: AsyncSession, tenant_id: str) -> None:
    """Hold the tenant's advisory lock until the transaction ends: quota checks of one tenant (count,
    then insert) run one after another, so concurrent calls cannot all pass one count."""
    await session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended("tenant:" + tenant_id, 0))))


async def tenant_counts(session: AsyncSession, tenant_id: str) -> tuple[int, int]:
    """(the tenant's unfinished jobs, its adapters with a ready version)."""
    jobs = await session.scalar(select(func.count()).select_from(JobRow).where(
        JobRow.tenant_id == tenant_id, JobRow.status.not_in(FINAL_JOB_STATUSES)))
    adapters = await session.scalar(select(func.count(func.distinct(AdapterRow.adapter_id))).where(
        AdapterRow.tenant_id == tenant_id, AdapterRow.status == "ready"))
    return int(jobs or 0), int(adapters or 0)


async def unfinished_jobs_of_adapter(session: AsyncSession, adapter_id: str) -> list[str]:
    """Jobs not yet finished that train ``adapter_id`` or start from it."""
    query = select(JobRow.job_id).where(
        JobRow.status.not_in(FINAL_JOB_STATUSES),
        or_(JobRow.adapter_id == adapter_id, JobRow.spec["base_adapter"].astext == adapter_id),
    ).order_by(JobRow.created_at)
    return list((await session.scalars(query)).all())


async def tenant_job(session: AsyncSession, job_id: str, tenant_id: str) -> JobRow | None:
    return await session.scalar(select(JobRow).where(JobRow.job_id == job_id, JobRow.tenant_id == tenant_id))


async def tenant_jobs(session: AsyncSession, tenant_id: str, *, after: str | None, limit: int) -> list[JobRow]:
    """The tenant's jobs, newest first; ``after`` = the last job_id of the previous page."""
    query = select(JobRow).where(JobRow.tenant_id == tenant_id)
    if after is not None:
        anchor = await tenant_job(session, after, tenant_id)
        if anchor is None:
            return []
        query = query.where(
            tuple_(JobRow.created_at, JobRow.job_id) < tuple_(anchor.created_at, anchor.job_id)
        )
    query = query.order_by(JobRow.created_at.desc(), JobRow.job_id.desc()).limit(limit)
    return list((await session.scalars(query)).all())


async def job_checkpoints(session: AsyncSession, job_id: str) -> list[CheckpointRow]:
    """A job's checkpoints, newest first, without their bytes."""
    query = (
        select(CheckpointRow)
        .options(defer(CheckpointRow.data))
        .where(CheckpointRow.job_id == job_id)
        .order_by(CheckpointRow.step.desc())
    )
    return list((await session.scalars(query)).all())


async def job_adapter_version(session: AsyncSession, job_id: str) -> int | None:
    """The adapter version a finished job registered, if any."""
    version: int | None = await session.scalar(
        select(func.max(AdapterRow.version)).where(and_(AdapterRow.job_id == job_id, AdapterRow.status == "ready"))
    )
    return version
