"""A key's tokens per minute.

``api_keys.max_tokens_per_minute``: the tokens (prompt and completion) a key may use a minute at a
gateway, beside its requests per minute. NULL: no limit, as for every key made before.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 13:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("max_tokens_per_minute", sa.Integer(), nullable=True))
    op.create_check_constraint(op.f("ck_api_keys_token_rate_positive"), "api_keys",
                               "max_tokens_per_minute IS NULL OR max_tokens_per_minute > 0")


def downgrade() -> None:
    op.drop_constraint(op.f("ck_api_keys_token_rate_positive"), "api_keys", type_="check")
    op.drop_column("api_keys", "max_tokens_per_minute")
