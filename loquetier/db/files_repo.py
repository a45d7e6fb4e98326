"""Uploaded files (JSONL training data), bytes in the database so that any worker reads them.

Functions run in the caller's transaction and never commit.
"""

from __future__ import annotations

import hashlib
import uuid

from sqlalchemy import delete, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import defer

from loquetier.db.jobs_repo import FINAL_JOB_STATUSES
from loquetier.db.models import FileRow, JobRow

FILE_URI_PREFIX = "file:"  # a TrainingJobRecord's data "file:<file_id>" names a row of this table


async def add_file(
    session: AsyncSession, *, tenant_id: str | None, purpose: str, filename: str, data: bytes, num_examples: int
) -> FileRow:
    row = FileRow(
        file_id=f"file-{uuid.uuid4().hex[:24]}",
        tenant_id=tenant_id,
        purpose=purpose,
        filename=filename,
        size_bytes=len(data),
        num_examples=num_examples,
        sha256=hashlib.sha256(data).hexdigest(),
        data=data,
    )
    session.add(row)
    await session.flush()
    await session.refresh(row)
    return row


async def tenant_usage(session: AsyncSession, tenant_id: str) -> tuple[int, int]:
    """(number of files, their bytes) stored for ``tenant_id``."""
    row = (await session.execute(
        select(func.count(), func.coalesce(func.sum(FileRow.size_bytes), 0)).where(FileRow.tenant_id == tenant_id)
    )).one()
    return int(row[0]), int(row[1])


async def get_file(session: AsyncSession, file_id: str, *, with_data: bool = False) -> FileRow | None:
    """A file's row; its bytes only when asked (``with_data``)."""
    query = select(FileRow).where(FileRow.file_id == file_id)
    if not with_data:
        query = query.options(defer(FileRow.data))
    return await session.scalar(query)


async def file_data(session: AsyncSession, file_id: str) -> bytes | None:
    data: bytes | None = await session.scalar(select(FileRow.data).where(FileRow.file_id == file_id))
    return data


async def list_files(session: AsyncSession, tenant_id: str | None, *, limit: int = 100, after: str | None = None,
                     newest_first: bool = True, purpose: str | None = None) -> list[FileRow]:
    """A tenant's files without their bytes, by creation time; ``after`` = the last file_id of the
    previous page (an unknown one: no rows)."""
    query = select(FileRow).options(defer(FileRow.data))
    query = query.where(FileRow.tenant_id.is_(None) if tenant_id is None else FileRow.tenant_id == tenant_id)
    if purpose is not None:
        query = query.where(FileRow.purpose == purpose)
    key = tuple_(FileRow.created_at, FileRow.file_id)
    if after is not None:
        anchor = await get_file(session, after)
        if anchor is None or anchor.tenant_id != tenant_id:
            return []
        mark = tuple_(anchor.created_at, anchor.file_id)
        query = query.where(key < mark if newest_first else key > mark)
    order = (FileRow.created_at.desc(), FileRow.file_id.desc()) if newest_first else (FileRow.created_at,
                                                                                         FileRow.file_id)
    return list((await session.scalars(query.order_by(*order).limit(limit))).all())


async def delete_file(session: AsyncSession, file_id: str) -> bool:
    stmt = delete(FileRow).where(FileRow.file_id == file_id).returning(FileRow.file_id)
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def jobs_using_file(session: AsyncSession, file_id: str) -> list[str]:
    """Unfinished jobs whose data or eval data is this file (a worker reads it again on resume)."""
    ref = f"{FILE_URI_PREFIX}{file_id}"
    query = select(JobRow.job_id).where(
        JobRow.status.not_in(FINAL_JOB_STATUSES),
        (JobRow.spec["data"].astext == ref) | (JobRow.spec["eval_data"].astext == ref),
    )
    return list((await session.scalars(query)).all())
