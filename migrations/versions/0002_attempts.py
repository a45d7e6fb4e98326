"""Poison ends and duplicate detection: request attempts and a content hash.

``inference_requests.attempts`` counts the starts of a request that did not end cleanly
(its worker crashed or stalled); at ``LOQUETIER_WORKER__MAX_ATTEMPTS`` the request is
failed ``poisoned``. ``content_sha256`` fingerprints what a request asks for, so that a
second request reusing its ``request_id`` for something else is refused.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 09:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("inference_requests", sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
    op.add_column("inference_requests", sa.Column("content_sha256", sa.String(length=64), nullable=True))
    op.create_index(
        "ix_inference_requests_kafka_position",
        "inference_requests",
        ["kafka_topic", "kafka_partition", "kafka_offset"],
        unique=False,
        postgresql_where=sa.text("finished_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_inference_requests_kafka_position",
        table_name="inference_requests",
        postgresql_where=sa.text("finished_at IS NULL"),
    )
    op.drop_column("inference_requests", "content_sha256")
    op.drop_column("inference_requests", "attempts")
