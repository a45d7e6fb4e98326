"""The Kafka records a request's outcome answered, so that a redelivered record is not answered twice.

``inference_requests.answered_records`` lists ``{"topic", "partition", "offset", "timestamp"}`` for
each record whose final record (``result`` or ``error``) the broker acknowledged, the last eight. A
record that comes back because its offset was not committed yet (its worker was killed while an
earlier record of the partition still ran) is then only marked done. A new record with the same
request_id (another offset, or the same offset with another timestamp: a restarted in-memory broker
numbers its log from 0 again) still gets the stored result.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 07:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "inference_requests",
        sa.Column(
            "answered_records",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
    )


def downgrade() -> None:
    op.drop_column("inference_requests", "answered_records")
