"""Control commands answered once: ``control_acks``.

A worker that stopped after applying a command and before committing its offset applied it again
when the command was delivered again: a second adapter version for one ``load``, an error ack for
an ``unload`` that had succeeded. Each command's ack is now kept by its ``command_id`` (with a
digest of its content), and a command delivered again is answered with the kept ack.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 00:20:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "control_acks",
        sa.Column("command_id", sa.String(length=256), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("ack", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("command_id", name=op.f("pk_control_acks")),
    )
    op.create_index("ix_control_acks_created_at", "control_acks", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_control_acks_created_at", table_name="control_acks")
    op.drop_table("control_acks")
