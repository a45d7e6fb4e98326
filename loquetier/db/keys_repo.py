"""Tenants and API keys. A key is ``lq-`` + 43 url-safe characters (32 random bytes); only its
sha256 is stored, so a leaked table does not leak keys. Functions run in the caller's
transaction and never commit.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from loquetier.db.models import ApiKeyRow, TenantRow

KEY_PREFIX = "lq-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class KeyOwner:
    """What a valid key resolves to."""

    key_id: str
    tenant_id: str
    max_requests_per_minute: int | None
    max_tokens_per_minute: int | None = None


async def ensure_tenant(session: AsyncSession, tenant_id: str) -> None:
    stmt = insert(TenantRow).values(tenant_id=tenant_id).on_conflict_do_nothing(index_elements=[TenantRow.tenant_id])
    await session.execute(stmt)


async def create_key(
    session: AsyncSession, *, name: str, tenant_id: str, max_requests_per_minute: int | None = None,
    max_tokens_per_minute: int | None = None,
) -> tuple[ApiKeyRow, str]:
    """A new key for ``tenant_id`` (created if new); returns the row and the key, shown only now."""
    await ensure_tenant(session, tenant_id)
    key = new_key()
    row = ApiKeyRow(
        key_id=f"key-{uuid.uuid4().hex[:16]}",
        tenant_id=tenant_id,
        name=name,
        key_sha256=hash_key(key),
        max_requests_per_minute=max_requests_per_minute,
        max_tokens_per_minute=max_tokens_per_minute,
    )
    session.add(row)
    await session.flush()
    return row, key


async def find_key(session: AsyncSession, key: str) -> KeyOwner | None:
    """The owner of a live (not revoked) key, or None."""
    row = await session.scalar(
        select(ApiKeyRow).where(ApiKeyRow.key_sha256 == hash_key(key), ApiKeyRow.revoked_at.is_(None))
    )
    if row is None:
        return None
    return KeyOwner(row.key_id, row.tenant_id, row.max_requests_per_minute, row.max_tokens_per_minute)


async def list_keys(session: AsyncSession, tenant_id: str | None = None) -> list[ApiKeyRow]:
    query = select(ApiKeyRow).order_by(ApiKeyRow.created_at)
    if tenant_id is not None:
        query = query.where(ApiKeyRow.tenant_id == tenant_id)
    return list((await session.scalars(query)).all())


async def revoke_key(session: AsyncSession, key_id: str) -> bool:
    stmt = (
        update(ApiKeyRow)
        .where(ApiKeyRow.key_id == key_id, ApiKeyRow.revoked_at.is_(None))
        .values(revoked_at=func.now())
        .returning(ApiKeyRow.key_id)
    )
    return (await session.execute(stmt)).scalar_one_or_none() is not None
