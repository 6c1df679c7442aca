"""Risk profiles carry a version: a profile write names the version it read and moves it on by one.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 00:00:00+00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def upgrade() -> None:
    with op.batch_alter_table("risk_profiles") as batch:
        batch.add_column(sa.Column("version", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("risk_profiles") as batch:
        batch.drop_column("version")
