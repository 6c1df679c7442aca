"""Enumeration defence: each API key's failed verifications and redemptions in its current window.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 00:00:00+00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "caller_failures",
        sa.Column("caller", sa.String(64), nullable=False),
        sa.Column("window_started_at", _TIME, nullable=False),
        sa.Column("window_failures", sa.Integer(), nullable=False),
        sa.Column("times_refused", sa.BigInteger(), nullable=False),
        sa.Column("last_refused_at", _TIME, nullable=True),
        sa.PrimaryKeyConstraint("caller", name=op.f("pk_caller_failures")),
    )


def downgrade() -> None:
    op.drop_table("caller_failures")
