"""Review cases (opened by scoring and by the number watch), the analyst role that works them, and the number
watch's memory: each number's counters as last seen and its usual use, and the watch's clock.

Revision ID: 0012
Revises: 0011
Create Date: 2027-01-05 00:00:00+00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

_TIME = sa.DateTime(timezone=True)
# Frozen here on purpose: a migration must not change when the code does.
_ROLES_BEFORE = "role IN ('gateway', 'admin', 'auditor', 'trainer')"
_ROLES = "role IN ('gateway', 'admin', 'auditor', 'trainer', 'analyst')"
_UNRESOLVED = sa.text("status != 'resolved'")


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_constraint(op.f("ck_api_keys_role"), type_="check")
        batch.create_check_constraint(op.f("ck_api_keys_role"), _ROLES)
    op.create_table(
        "cases",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("case_id", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("customer_id", sa.String(length=32), nullable=False),
        sa.Column("transaction_id", sa.String(length=128), nullable=True),
        sa.Column("number", sa.String(length=40), nullable=True),
        sa.Column("decision", sa.String(length=16), nullable=True),
        sa.Column("risk_score", sa.Double(), nullable=True),
        sa.Column("reasons", sa.Text(), nullable=False),
        sa.Column("reason_codes", sa.Text(), nullable=False),
        sa.Column("opened_at", _TIME, nullable=False),
        sa.Column("assignee", sa.String(length=100), nullable=True),
        sa.Column("assigned_at", _TIME, nullable=True),
        sa.Column("resolution", sa.String(length=16), nullable=True),
        sa.Column("note", sa.String(length=1000), nullable=True),
        sa.Column("resolved_at", _TIME, nullable=True),
        sa.Column("resolved_by", sa.String(length=64), nullable=True),
        sa.CheckConstraint("kind IN ('number_watch', 'transaction')", name=op.f("ck_cases_kind")),
        sa.CheckConstraint("status IN ('assigned', 'open', 'resolved')", name=op.f("ck_cases_status")),
        sa.CheckConstraint(
            "resolution IN ('dismiss', 'fraud', 'legitimate', 'rotate')", name=op.f("ck_cases_resolution")
        ),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.customer_id"], name=op.f("fk_cases_customer_id_customers")
        ),
        sa.ForeignKeyConstraint(
            ["transaction_id"],
            ["risk_transactions.transaction_id"],
            name=op.f("fk_cases_transaction_id_risk_transactions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cases")),
        sa.UniqueConstraint("case_id", name=op.f("uq_cases_case_id")),
        sa.UniqueConstraint("transaction_id", name=op.f("uq_cases_transaction_id")),
    )
    op.create_index(op.f("ix_cases_customer_id"), "cases", ["customer_id"])
    op.create_index(op.f("ix_cases_opened_at"), "cases", ["opened_at"])
    op.create_index(op.f("ix_cases_assignee"), "cases", ["assignee"])
    op.create_index("ix_cases_status_id", "cases", ["status", "id"])
    op.create_index(
        "uq_cases_open_number",
        "cases",
        ["number"],
        unique=True,
        sqlite_where=_UNRESOLVED,
        postgresql_where=_UNRESOLVED,
    )
    op.create_table(
        "number_watch",
        sa.Column("number", sa.String(length=40), nullable=False),
        sa.Column("customer_id", sa.String(length=32), nullable=False),
        sa.Column("verifications", sa.BigInteger(), nullable=False),
        sa.Column("failed_verifications", sa.BigInteger(), nullable=False),
        sa.Column("usual_verifications", sa.Double(), nullable=False),
        sa.Column("usual_failed_verifications", sa.Double(), nullable=False),
        sa.Column("usual_transactions", sa.Double(), nullable=False),
        sa.Column("usual_refused_codes", sa.Double(), nullable=False),
        sa.Column("usual_merchants", sa.Double(), nullable=False),
        sa.Column("windows", sa.Integer(), nullable=False),
        sa.Column("seen_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("number", name=op.f("pk_number_watch")),
    )
    op.create_table(
        "number_watch_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("started_at", _TIME, nullable=False),
        sa.Column("last_run_at", _TIME, nullable=False),
        sa.Column("last_transaction_row", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_number_watch_state")),
        sa.CheckConstraint("id = 1", name=op.f("ck_number_watch_state_single_row")),
    )


def downgrade() -> None:
    op.drop_table("number_watch_state")
    op.drop_table("number_watch")
    op.drop_table("cases")
    op.execute("DELETE FROM api_keys WHERE role = 'analyst'")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_constraint(op.f("ck_api_keys_role"), type_="check")
        batch.create_check_constraint(op.f("ck_api_keys_role"), _ROLES_BEFORE)
