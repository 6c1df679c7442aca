"""Shadow scoring: the shadow run's version and score next to each transaction scored while one was running,
an index that finds the run in shadow, and one that finds a training run's models by version.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 00:00:00+00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def upgrade() -> None:
    # Nullable columns without a default: adding them rewrites no rows on either backend.
    with op.batch_alter_table("risk_transactions") as batch:
        batch.add_column(sa.Column("shadow_version", sa.String(64), nullable=True))
        batch.add_column(sa.Column("shadow_risk_score", sa.Double(), nullable=True))
    op.create_index(
        op.f("ix_risk_transactions_shadow_version"),
        "risk_transactions",
        ["shadow_version"],
        sqlite_where=sa.text("shadow_version IS NOT NULL"),
        postgresql_where=sa.text("shadow_version IS NOT NULL"),
    )
    op.create_index(op.f("ix_risk_models_version"), "risk_models", ["version"])
    op.create_index(
        op.f("ix_risk_models_shadow_version"),
        "risk_models",
        ["version"],
        sqlite_where=sa.text("status = 'SHADOW'"),
        postgresql_where=sa.text("status = 'SHADOW'"),
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_risk_models_shadow_version"), table_name="risk_models")
    op.drop_index(op.f("ix_risk_models_version"), table_name="risk_models")
    op.drop_index(op.f("ix_risk_transactions_shadow_version"), table_name="risk_transactions")
    with op.batch_alter_table("risk_transactions") as batch:
        batch.drop_column("shadow_risk_score")
        batch.drop_column("shadow_version")
