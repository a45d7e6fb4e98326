"""Inference request rows: idempotent insert, start, finish, lookup.

Every function runs inside the caller's transaction (``async with sessions.begin() as s``)
and never commits: the caller decides the unit of work.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from loquetier.db.models import RequestRow


async def insert_request_idempotent(
    session: AsyncSession,
    *,
    request_id: str,
    adapter_id: str | None,
    priority: int = 0,
    prompt_tokens: int | None = None,
    kafka_topic: str | None = None,
    kafka_partition: int | None = None,
    kafka_offset: int | None = None,
) -> bool:
    """Insert a queued request; ``True`` if new, ``False`` if ``request_id`` already exists."""
    stmt = (
        insert(RequestRow)
        .values(
            request_id=request_id,
            adapter_id=adapter_id,
            priority=priority,
            prompt_tokens=prompt_tokens,
            kafka_topic=kafka_topic,
            kafka_partition=kafka_partition,
            kafka_offset=kafka_offset,
        )
        .on_conflict_do_nothing(index_elements=[RequestRow.request_id])
        .returning(RequestRow.request_id)
    )
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def start_request(
    session: AsyncSession, request_id: str, worker_id: str, *, prompt_tokens: int | None = None
) -> None:
    """Mark a request running on ``worker_id`` (also after a redelivery to another worker)."""
    values: dict[str, Any] = {"status": "running", "worker_id": worker_id, "started_at": func.now()}
    if prompt_tokens is not None:
        values["prompt_tokens"] = prompt_tokens
    await session.execute(update(RequestRow).where(RequestRow.request_id == request_id).values(**values))


async def finish_request(
    session: AsyncSession,
    request_id: str,
    *,
    status: str,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    queued_ms: float | None = None,
    ttft_ms: float | None = None,
    tpot_ms: float | None = None,
) -> bool:
    """Record the outcome (``result`` is the "result" record as a map, for republishing).

    Returns ``False`` when the request was already finished (the first outcome wins).
    """
    stmt = (
        update(RequestRow)
        .where(RequestRow.request_id == request_id, RequestRow.finished_at.is_(None))
        .values(
            status=status,
            result=result,
            error=error,
            prompt_tokens=func.coalesce(prompt_tokens, RequestRow.prompt_tokens),
            completion_tokens=completion_tokens,
            queued_ms=queued_ms,
            ttft_ms=ttft_ms,
            tpot_ms=tpot_ms,
            finished_at=func.now(),
        )
        .returning(RequestRow.request_id)
    )
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def get_request(session: AsyncSession, request_id: str) -> RequestRow | None:
    return await session.scalar(select(RequestRow).where(RequestRow.request_id == request_id))
