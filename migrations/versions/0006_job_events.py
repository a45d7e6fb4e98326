"""Each job's history: ``job_events``, one row per thing that happened to it.

A job row holds only its present (status, step, last loss), so a pause, a resume, a lost lease or
the loss curve left no trace. Every transition in ``jobs_repo`` now writes an event in the same
transaction; checkpoints and metrics reports carry their ``step`` and are written once per step
(a partial unique index). Jobs that exist when this runs get the events their rows still tell:
created, started, each stored checkpoint, and their final status.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 09:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BACKFILL = """
INSERT INTO job_events (job_id, kind, level, message, step, data, created_at)
SELECT job_id, kind, level, message, step, data, at FROM (
    SELECT job_id, 'created' AS kind, 'info' AS level,
           'Created ' || CASE kind WHEN 'evaluate' THEN 'evaluation' ELSE 'fine-tuning' END || ' job ' || job_id
               AS message,
           NULL::integer AS step, '{}'::jsonb AS data, created_at AS at
    FROM training_jobs
    UNION ALL
    SELECT job_id, 'started', 'info', 'Started (attempt ' || attempts || ')', NULL,
           jsonb_build_object('attempt', attempts), started_at
    FROM training_jobs WHERE started_at IS NOT NULL
    UNION ALL
    SELECT job_id, 'checkpoint', 'info', 'Checkpoint saved at step ' || step, step,
           jsonb_build_object('step', step, 'size_bytes', size_bytes), created_at
    FROM checkpoints
    UNION ALL
    SELECT job_id, status, CASE status WHEN 'failed' THEN 'error' ELSE 'info' END,
           CASE status WHEN 'cancelled' THEN 'The job was cancelled'
                       WHEN 'failed' THEN 'The job has failed: ' || left(coalesce(error, 'no reason stored'), 500)
                       ELSE 'The job has succeeded' END,
           NULL, '{}'::jsonb, finished_at
    FROM training_jobs WHERE finished_at IS NOT NULL AND status IN ('succeeded', 'failed', 'cancelled')
) AS story
ORDER BY at, job_id
"""


def upgrade() -> None:
    op.create_table(
        "job_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("job_id", sa.String(length=256), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("level", sa.String(length=8), server_default="info", nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=True),
        sa.Column(
            "data",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("worker_id", sa.String(length=256), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("level IN ('info', 'warn', 'error')", name=op.f("ck_job_events_level_valid")),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["training_jobs.job_id"],
            name=op.f("fk_job_events_job_id_training_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_events")),
    )
    op.create_index("ix_job_events_job_id_id", "job_events", ["job_id", "id"], unique=False)
    op.create_index("uq_job_events_job_id_kind_step", "job_events", ["job_id", "kind", "step"], unique=True,
                    postgresql_where=sa.text("step IS NOT NULL"))
    op.execute(_BACKFILL)


def downgrade() -> None:
    op.drop_index("uq_job_events_job_id_kind_step", table_name="job_events")
    op.drop_index("ix_job_events_job_id_id", table_name="job_events")
    op.drop_table("job_events")
