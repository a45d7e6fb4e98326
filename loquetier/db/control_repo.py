"""Control commands' answers, kept by ``command_id`` (``control_acks``, migration 0009).

Functions run in the caller's transaction and never commit.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from loquetier.db.models import ControlAckRow

# Kept this long: a command delivered again comes back within the topic's retention, not later
ACK_RETENTION = timedelta(days=7)


async def kept_command_ack(session: AsyncSession, command_id: str) -> tuple[str, dict[str, Any]] | None:
    """(digest, ack) of the command answered under ``command_id``, if one was."""
    row = await session.get(ControlAckRow, command_id)
    return None if row is None else (row.digest, dict(row.ack))


async def keep_command_ack(session: AsyncSession, command_id: str, digest: str, ack: dict[str, Any]) -> None:
    """Keep ``ack`` as the answer to ``command_id`` (the first one kept stays); drop answers older
    than ``ACK_RETENTION``."""
    stmt = insert(ControlAckRow).values(command_id=command_id, digest=digest, ack=ack)
    await session.execute(stmt.on_conflict_do_nothing(index_elements=["command_id"]))
    await session.execute(delete(ControlAckRow).where(ControlAckRow.created_at < func.now() - ACK_RETENTION))
