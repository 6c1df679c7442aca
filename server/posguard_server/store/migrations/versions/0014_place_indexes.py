"""Indexes of the places each customer paid at, for the rules' customer.new_merchant and new_terminal.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04 00:00:00+00:00
"""

from __future__ import annotations

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_risk_transactions_customer_merchant",
        "risk_transactions",
        ["customer_id", "merchant_id", "in_history"],
    )
    op.create_index(
        "ix_risk_transactions_customer_terminal",
        "risk_transactions",
        ["customer_id", "terminal_id", "in_history"],
    )


def downgrade() -> None:
    op.drop_index("ix_risk_transactions_customer_terminal", table_name="risk_transactions")
    op.drop_index("ix_risk_transactions_customer_merchant", table_name="risk_transactions")
