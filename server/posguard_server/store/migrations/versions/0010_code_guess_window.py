"""Dynamic-code enrolments count wrong codes in a window, summed over all keys (the per-target limit).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 00:00:00+00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def upgrade() -> None:
    with op.batch_alter_table("dynamic_enrollments") as batch:
        batch.add_column(sa.Column("guess_window_started_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("guess_window_failures", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("dynamic_enrollments") as batch:
        batch.drop_column("guess_window_failures")
        batch.drop_column("guess_window_started_at")
