"""Inference request rows: idempotent insert, start, finish, answered records, lookup.

Every function runs inside the caller's transaction (``async with sessions.begin() as s``)
and never commits: the caller decides the unit of work.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import func, literal, literal_column, or_, select, update
from sqlalchemy.dialects.postgresql import JSONB, JSONPATH, insert
from sqlalchemy.ext.asyncio import AsyncSession

from loquetier.db.models import RequestRow, WorkerRow

MAX_ANSWERED_RECORDS = 8  # per row; an older record coming back is answered again (at least once)


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
    content_sha256: str | None = None,
    started_by: str | None = None,
) -> bool:
    """Insert a queued request; ``True`` if new, ``False`` if ``request_id`` already exists.

    ``started_by``: a new row is inserted already running on that worker, its first attempt counted
    (what :func:`start_request` would make of it, in the same statement: one round trip less on
    every request's way in)."""
    started: dict[str, Any] = {} if started_by is None else {
        "status": "running", "worker_id": started_by, "started_at": func.now(), "attempts": 1}
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
            content_sha256=content_sha256,
            **started,
        )
        .on_conflict_do_nothing(index_elements=[RequestRow.request_id])
        .returning(RequestRow.request_id)
    )
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def start_request(
    session: AsyncSession,
    request_id: str,
    worker_id: str,
    *,
    prompt_tokens: int | None = None,
    max_attempts: int | None = None,
) -> int | None:
    """Mark an unfinished request running on ``worker_id`` and count the attempt.

    Returns the attempt number (1 = first start), or ``None`` when the row is finished or
    already has ``max_attempts`` starts that never ended (poisoned: the caller fails it).
    """
    values: dict[str, Any] = {
        "status": "running",
        "worker_id": worker_id,
        "started_at": func.now(),
        "attempts": RequestRow.attempts + 1,
    }
    if prompt_tokens is not None:
        values["prompt_tokens"] = prompt_tokens
    stmt = update(RequestRow).where(RequestRow.request_id == request_id, RequestRow.finished_at.is_(None))
    if max_attempts is not None:
        stmt = stmt.where(RequestRow.attempts < max_attempts)
    attempt: int | None = (await session.execute(stmt.values(**values).returning(RequestRow.attempts))).scalar()
    return attempt


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
    answering: Sequence[dict[str, Any]] = (),
) -> bool:
    """Record the outcome (``result`` is the "result" record as a map, for republishing).

    ``answering``: the Kafka records the outcome is about to be published for. They are listed in
    ``answered_records`` marked ``"pending": true`` (not answered yet): one that comes back unlisted
    as answered was waiting when the outcome was stored, so its answer may be out already
    (``workers/answer_log.py``), where a record not listed at all is a new one (a client's retry).

    Returns ``False`` when the request was already finished (the first outcome wins).
    """
    values: dict[str, Any] = {
        "status": status, "result": result, "error": error,
        "prompt_tokens": func.coalesce(prompt_tokens, RequestRow.prompt_tokens),
        "completion_tokens": completion_tokens, "queued_ms": queued_ms, "ttft_ms": ttft_ms, "tpot_ms": tpot_ms,
        "finished_at": func.now(),
    }
    if answering:
        values["answered_records"] = _appended([{**r, "pending": True} for r in answering])
    stmt = (
        update(RequestRow)
        .where(RequestRow.request_id == request_id, RequestRow.finished_at.is_(None))
        .values(**values)
        .returning(RequestRow.request_id)
    )
    return (await session.execute(stmt)).scalar_one_or_none() is not None


def _appended(records: list[dict[str, Any]]) -> Any:
    """``answered_records`` with ``records`` appended, its last :data:`MAX_ANSWERED_RECORDS` kept."""
    appended = RequestRow.answered_records.op("||", return_type=JSONB)(literal(records, JSONB))
    # the last N elements; lax mode takes a shorter list whole
    last = literal_column(f"'$[last - {MAX_ANSWERED_RECORDS - 1} to last]'::jsonpath", JSONPATH)
    return func.jsonb_path_query_array(appended, last)


async def add_answered_records(session: AsyncSession, request_id: str, records: list[dict[str, Any]]) -> bool:
    """Append Kafka records (``{"topic", "partition", "offset", "timestamp"}``) that were answered for
    ``request_id``, keeping the last :data:`MAX_ANSWERED_RECORDS`. Call it only once the broker has
    acknowledged their answers. ``updated_at`` stays: it tells the reconciler when the request
    itself last moved. Returns ``False`` when there is no such row."""
    stmt = (
        update(RequestRow)
        .where(RequestRow.request_id == request_id)
        .values(answered_records=_appended(records), updated_at=RequestRow.updated_at)
        .returning(RequestRow.request_id)
    )
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def get_request(session: AsyncSession, request_id: str) -> RequestRow | None:
    return await session.scalar(select(RequestRow).where(RequestRow.request_id == request_id))


async def get_requests(session: AsyncSession, request_ids: Collection[str]) -> dict[str, RequestRow]:
    """The rows of those of ``request_ids`` that exist, by id (one query for many)."""
    rows = await session.scalars(select(RequestRow).where(RequestRow.request_id.in_(list(request_ids))))
    return {row.request_id: row for row in rows}


async def stale_requests(
    session: AsyncSession,
    *,
    topic: str,
    partition: int,
    below_offset: int,
    worker_id: str,
    idle_s: float,
    exclude: list[str],
    limit: int = 100,
) -> list[RequestRow]:
    """Unfinished rows whose record lies below a committed offset (it will not be delivered
    again) and that nobody alive runs: no owner, a gone owner (no heartbeat for ``idle_s``),
    or ``worker_id`` itself when not in ``exclude`` (its in-flight ids)."""
    live = select(WorkerRow.worker_id).where(
        WorkerRow.status.in_(("starting", "running", "draining")),
        WorkerRow.heartbeat_at > func.now() - func.make_interval(0, 0, 0, 0, 0, 0, idle_s),
    )
    query = select(RequestRow).where(
        RequestRow.finished_at.is_(None),
        RequestRow.kafka_topic == topic,
        RequestRow.kafka_partition == partition,
        RequestRow.kafka_offset < below_offset,
        RequestRow.updated_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, idle_s),
        or_(RequestRow.worker_id.is_(None), RequestRow.worker_id == worker_id, RequestRow.worker_id.not_in(live)),
    )
    if exclude:
        query = query.where(RequestRow.request_id.not_in(exclude))
    return list((await session.scalars(query.order_by(RequestRow.kafka_offset).limit(limit))).all())
