"""Archived adapter versions keep their record, not their weights.

An unloaded (archived) version is never served again, yet its bytes stayed in ``adapters.data`` or
its file under the checkpoint directory for good. The payload check now holds for versions that
are not archived; a worker that unloads an adapter clears its archived versions' payloads and
removes their files. Versions archived before this migration lose their bytes here; their files,
where they had one, stay until the adapter is unloaded again (a migration does not reach the
workers' storage).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 02:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint(op.f("ck_adapters_has_payload"), "adapters", type_="check")
    op.create_check_constraint(
        op.f("ck_adapters_has_payload"), "adapters", "status = 'archived' OR data IS NOT NULL OR uri IS NOT NULL")
    op.execute("UPDATE adapters SET data = NULL WHERE status = 'archived' AND uri IS NULL")


def downgrade() -> None:
    # versions without a payload cannot stay under the old check: they were archived, never served again
    op.execute("DELETE FROM adapters WHERE data IS NULL AND uri IS NULL")
    op.drop_constraint(op.f("ck_adapters_has_payload"), "adapters", type_="check")
    op.create_check_constraint(op.f("ck_adapters_has_payload"), "adapters", "data IS NOT NULL OR uri IS NOT NULL")
