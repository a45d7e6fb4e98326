"""Checkpoints and adapter versions: bytes in the database or a URI plus sha256.

Functions run in the caller's transaction and never commit.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from loquetier.db.jobs_repo import json_safe, record_job_event
from loquetier.db.models import AdapterRow, CheckpointRow, JobRow


def _payload(
    data: bytes | None, uri: str | None, sha256: str | None, size_bytes: int | None
) -> dict[str, Any]:
    if (data is None) == (uri is None):
        raise ValueError("give exactly one of data (bytes) or uri")
    if data is not None:
        digest = hashlib.sha256(data).hexdigest()
        if sha256 is not None and sha256 != digest:
            raise ValueError("sha256 does not match data")
        return {"data": data, "uri": None, "sha256": digest, "size_bytes": len(data)}
    if sha256 is None or size_bytes is None:
        raise ValueError("a uri needs its sha256 and size_bytes")
    return {"data": None, "uri": uri, "sha256": sha256, "size_bytes": size_bytes}


async def job_taken_by(session: AsyncSession, job_id: str, worker_id: str, *, lock: bool = False) -> str | None:
    """The worker that holds ``job_id`` when it is another than ``worker_id`` (a worker whose lease ran
    out and whose job another worker took): such a worker must not store the job's checkpoints. None when
    the job is ours, held by nobody (paused, queued: a checkpoint of steps already made stays good) or
    unknown. ``lock``: hold the job's row until the transaction ends, so that no claim comes between."""
    stmt = select(JobRow.worker_id).where(JobRow.job_id == job_id)
    holder = await session.scalar(stmt.with_for_update() if lock else stmt)
    return holder if holder is not None and holder != worker_id else None


async def save_checkpoint(
    session: AsyncSession,
    *,
    job_id: str,
    step: int,
    data: bytes | None = None,
    uri: str | None = None,
    sha256: str | None = None,
    size_bytes: int | None = None,
    meta: dict[str, Any] | None = None,
) -> CheckpointRow:
    """Store (or replace) the checkpoint of ``job_id`` at ``step``."""
    values = {"job_id": job_id, "step": step, "meta": json_safe(meta or {}), **_payload(data, uri, sha256, size_bytes)}
    stmt = insert(CheckpointRow).values(**values)
    replace = {k: stmt.excluded[k] for k in ("data", "uri", "sha256", "size_bytes", "meta")}
    upsert = stmt.on_conflict_do_update(
        index_elements=[CheckpointRow.job_id, CheckpointRow.step],
        set_=replace | {"created_at": func.now()},
    ).returning(CheckpointRow)
    result = await session.execute(upsert.execution_options(populate_existing=True))
    row = result.scalar_one()
    await record_job_event(session, job_id, "checkpoint", f"Checkpoint saved at step {step}", step=step,
                           data={"step": step, "size_bytes": row.size_bytes})
    return row


async def prune_checkpoints(session: AsyncSession, job_id: str, keep: int) -> list[str]:
    """Delete the checkpoints of ``job_id`` but the ``keep`` newest; the URIs of the deleted ones
    (their files are the caller's to remove once the transaction commits)."""
    return await _delete_all_but_newest(session, CheckpointRow, CheckpointRow.job_id == job_id,
                                        CheckpointRow.step, keep)


async def prune_adapter_versions(session: AsyncSession, adapter_id: str, keep: int) -> list[str]:
    """Delete the versions of ``adapter_id`` but the ``keep`` newest (whatever their status); the URIs
    of the deleted ones (their files are the caller's to remove once the transaction commits)."""
    return await _delete_all_but_newest(session, AdapterRow, AdapterRow.adapter_id == adapter_id,
                                        AdapterRow.version, keep)


async def _delete_all_but_newest(session: AsyncSession, table: Any, owner: Any, order: Any, keep: int) -> list[str]:
    """Delete the rows of ``table`` matching ``owner`` but the ``keep`` greatest by ``order``; the
    URIs of the deleted rows that had one."""
    newest = select(order).where(owner).order_by(order.desc()).limit(keep)
    stmt = delete(table).where(owner, order.not_in(newest.scalar_subquery())).returning(table.uri)
    return [uri for uri in (await session.execute(stmt)).scalars() if uri]


async def latest_checkpoint(session: AsyncSession, job_id: str) -> CheckpointRow | None:
    query = (
        select(CheckpointRow)
        .where(CheckpointRow.job_id == job_id)
        .order_by(CheckpointRow.step.desc())
        .limit(1)
    )
    return await session.scalar(query)


async def register_adapter(
    session: AsyncSession,
    *,
    adapter_id: str,
    rank: int,
    alpha: float,
    target_modules: list[str],
    source_kind: str,
    source: str | None = None,
    use_rslora: bool = False,
    job_id: str | None = None,
    data: bytes | None = None,
    uri: str | None = None,
    sha256: str | None = None,
    size_bytes: int | None = None,
    status: str = "ready",
    tenant_id: str | None = None,
) -> AdapterRow:
    """Add the next version of ``adapter_id`` (1, 2, ...); concurrent callers serialize.

    An adapter made by a job belongs to the job's tenant (null: shared, an operator's); a later
    version keeps the owner of the versions before it, whoever made it (an operator's overwrite of a
    tenant's adapter leaves it the tenant's, not shared).
    """
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": f"adapter:{adapter_id}"}
    )
    before = (await session.execute(
        select(AdapterRow.version, AdapterRow.tenant_id).where(AdapterRow.adapter_id == adapter_id)
        .order_by(AdapterRow.version.desc()).limit(1)
    )).first()
    if before is not None:
        tenant_id = before.tenant_id
    elif tenant_id is None and job_id is not None:
        tenant_id = await session.scalar(select(JobRow.tenant_id).where(JobRow.job_id == job_id))
    row = AdapterRow(
        adapter_id=adapter_id,
        version=(before.version if before is not None else 0) + 1,
        status=status,
        rank=rank,
        alpha=alpha,
        use_rslora=use_rslora,
        target_modules=target_modules,
        source_kind=source_kind,
        source=source,
        job_id=job_id,
        tenant_id=tenant_id,
        **_payload(data, uri, sha256, size_bytes),
    )
    session.add(row)
    await session.flush()
    await session.refresh(row)
    return row


async def get_adapter(
    session: AsyncSession, adapter_id: str, version: int | None = None
) -> AdapterRow | None:
    """A given version, or the latest ``ready`` one."""
    query = select(AdapterRow).where(AdapterRow.adapter_id == adapter_id)
    if version is not None:
        query = query.where(AdapterRow.version == version)
    else:
        query = query.where(AdapterRow.status == "ready").order_by(AdapterRow.version.desc()).limit(1)
    return await session.scalar(query)


async def adapter_taken(session: AsyncSession, adapter_id: str, job_id: str) -> AdapterRow | None:
    """The latest ready version of ``adapter_id`` when something other than job ``job_id``
    made it (another job, an operator load): a finetune must not silently replace it."""
    row = await get_adapter(session, adapter_id)
    if row is None or row.job_id == job_id:
        return None
    return row


async def ready_versions(session: AsyncSession, adapter_ids: list[str]) -> dict[str, int]:
    """Latest ready version of each adapter that has one."""
    rows = await session.execute(
        select(AdapterRow.adapter_id, func.max(AdapterRow.version))
        .where(AdapterRow.adapter_id.in_(adapter_ids), AdapterRow.status == "ready")
        .group_by(AdapterRow.adapter_id)
    )
    return {adapter_id: int(version) for adapter_id, version in rows.all()}


async def drop_archived_payloads(session: AsyncSession, adapter_id: str) -> tuple[int, list[str]]:
    """Clear the weights of ``adapter_id``'s archived versions (their rows stay, with checksum and
    size): how many versions had weights, and the URIs of their files (the caller's to remove once
    the transaction commits)."""
    held = (AdapterRow.adapter_id == adapter_id, AdapterRow.status == "archived",
            AdapterRow.data.is_not(None) | AdapterRow.uri.is_not(None))
    uris = (await session.scalars(select(AdapterRow.uri).where(*held).with_for_update())).all()
    await session.execute(update(AdapterRow).where(*held).values(data=None, uri=None))
    return len(uris), [uri for uri in uris if uri]


async def archive_adapter(session: AsyncSession, adapter_id: str) -> int:
    """Stop serving ``adapter_id`` everywhere: every ready version becomes archived."""
    stmt = (
        update(AdapterRow)
        .where(AdapterRow.adapter_id == adapter_id, AdapterRow.status == "ready")
        .values(status="archived")
        .returning(AdapterRow.version)
    )
    return len((await session.scalars(stmt)).all())
