"""Transaction risk: scored and imported transactions, outcome reports, customer profiles, the model registry
and its generation counter.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 00:00:00+00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "risk_transactions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("transaction_id", sa.String(128), nullable=False),
        sa.Column("customer_id", sa.String(32), nullable=False),
        sa.Column("event_time", _TIME, nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("merchant_id", sa.String(64), nullable=False),
        sa.Column("terminal_id", sa.String(64), nullable=False),
        sa.Column("mcc", sa.String(4), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("latitude", sa.Double(), nullable=True),
        sa.Column("longitude", sa.Double(), nullable=True),
        sa.Column("source", sa.String(8), nullable=False),
        sa.Column("in_history", sa.Boolean(), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("scored_at", _TIME, nullable=True),
        sa.Column("risk_score", sa.Double(), nullable=True),
        sa.Column("decision", sa.String(16), nullable=True),
        sa.Column("reasons", sa.Text(), nullable=True),
        sa.Column("model_scope", sa.String(16), nullable=True),
        sa.Column("model_version", sa.String(64), nullable=True),
        sa.Column("history_size", sa.Integer(), nullable=True),
        sa.Column("cold_start", sa.Boolean(), nullable=True),
        sa.Column("features", sa.LargeBinary(), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("outcome_at", _TIME, nullable=True),
        sa.Column("outcome_note", sa.String(1000), nullable=True),
        sa.Column("outcome_request_id", sa.String(128), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_risk_transactions")),
        sa.UniqueConstraint("transaction_id", name=op.f("uq_risk_transactions_transaction_id")),
        sa.UniqueConstraint("request_id", name=op.f("uq_risk_transactions_request_id")),
        sa.ForeignKeyConstraint(
            ["customer_id"],
            ["customers.customer_id"],
            name=op.f("fk_risk_transactions_customer_id_customers"),
        ),
        # Frozen here on purpose: a migration must not change when the code does.
        sa.CheckConstraint("source IN ('import', 'score')", name=op.f("ck_risk_transactions_source")),
        sa.CheckConstraint(
            "channel IN ('', 'pos', 'online', 'mobile')", name=op.f("ck_risk_transactions_channel")
        ),
        sa.CheckConstraint(
            "decision IN ('APPROVE', 'REVIEW', 'DECLINE')", name=op.f("ck_risk_transactions_decision")
        ),
        sa.CheckConstraint(
            "model_scope IN ('CUSTOMER', 'GLOBAL', 'NONE')", name=op.f("ck_risk_transactions_model_scope")
        ),
        sa.CheckConstraint(
            "outcome IN ('FRAUD', 'CHARGEBACK', 'LEGITIMATE')", name=op.f("ck_risk_transactions_outcome")
        ),
    )
    op.create_index(
        op.f("ix_risk_transactions_customer_time"), "risk_transactions", ["customer_id", "event_time", "id"]
    )
    op.create_index(op.f("ix_risk_transactions_outcome"), "risk_transactions", ["outcome", "outcome_at"])
    op.create_index(
        op.f("ix_risk_transactions_terminal_time"), "risk_transactions", ["terminal_id", "event_time"]
    )
    op.create_index(
        op.f("ix_risk_transactions_merchant_time"),
        "risk_transactions",
        ["merchant_id", "event_time"],
        sqlite_where=sa.text("terminal_id = ''"),
        postgresql_where=sa.text("terminal_id = ''"),
    )
    op.create_table(
        "risk_outcome_reports",
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("transaction_id", sa.String(128), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("outcome_at", _TIME, nullable=False),
        sa.Column("note", sa.String(1000), nullable=False),
        sa.Column("received_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_risk_outcome_reports")),
        sa.ForeignKeyConstraint(
            ["transaction_id"],
            ["risk_transactions.transaction_id"],
            name=op.f("fk_risk_outcome_reports_transaction_id_risk_transactions"),
        ),
        sa.CheckConstraint(
            "outcome IN ('FRAUD', 'CHARGEBACK', 'LEGITIMATE')", name=op.f("ck_risk_outcome_reports_outcome")
        ),
    )
    op.create_index(
        op.f("ix_risk_outcome_reports_transaction_id"), "risk_outcome_reports", ["transaction_id"]
    )
    op.create_table(
        "risk_profiles",
        sa.Column("customer_id", sa.String(32), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("transaction_count", sa.Integer(), nullable=False),
        sa.Column("first_seen", _TIME, nullable=True),
        sa.Column("last_seen", _TIME, nullable=True),
        sa.Column("declines", sa.Integer(), nullable=False),
        sa.Column("reviews", sa.Integer(), nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("customer_id", name=op.f("pk_risk_profiles")),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.customer_id"], name=op.f("fk_risk_profiles_customer_id_customers")
        ),
    )
    op.create_table(
        "risk_models",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("customer_id", sa.String(32), nullable=True),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("training_window_start", _TIME, nullable=False),
        sa.Column("training_window_end", _TIME, nullable=False),
        sa.Column("sample_count", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.Text(), nullable=False),
        sa.Column("activated_at", _TIME, nullable=True),
        sa.Column("previous_id", sa.Integer(), nullable=True),
        sa.Column("artifact", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_risk_models")),
        sa.UniqueConstraint(
            "scope", "customer_id", "version", name=op.f("uq_risk_models_scope_customer_version")
        ),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.customer_id"], name=op.f("fk_risk_models_customer_id_customers")
        ),
        sa.ForeignKeyConstraint(
            ["previous_id"], ["risk_models.id"], name=op.f("fk_risk_models_previous_id_risk_models")
        ),
        sa.CheckConstraint("scope IN ('CUSTOMER', 'GLOBAL')", name=op.f("ck_risk_models_scope")),
        sa.CheckConstraint(
            "status IN ('CANDIDATE', 'ACTIVE', 'SHADOW', 'RETIRED')", name=op.f("ck_risk_models_status")
        ),
        sa.CheckConstraint(
            "(scope = 'GLOBAL' AND customer_id IS NULL) OR (scope = 'CUSTOMER' AND customer_id IS NOT NULL)",
            name=op.f("ck_risk_models_scope_customer"),
        ),
    )
    # NULL customer_ids (GLOBAL models) never collide in a unique index: partial indexes cover them. Both
    # backends support partial indexes; each reads its own keyword.
    op.create_index(
        op.f("uq_risk_models_global_version"),
        "risk_models",
        ["version"],
        unique=True,
        sqlite_where=sa.text("customer_id IS NULL"),
        postgresql_where=sa.text("customer_id IS NULL"),
    )
    op.create_index(
        op.f("uq_risk_models_active_customer"),
        "risk_models",
        ["customer_id"],
        unique=True,
        sqlite_where=sa.text("status = 'ACTIVE'"),
        postgresql_where=sa.text("status = 'ACTIVE'"),
    )
    op.create_index(
        op.f("uq_risk_models_active_global"),
        "risk_models",
        ["scope"],
        unique=True,
        sqlite_where=sa.text("status = 'ACTIVE' AND customer_id IS NULL"),
        postgresql_where=sa.text("status = 'ACTIVE' AND customer_id IS NULL"),
    )
    op.create_table(
        "risk_model_generation",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("changed_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_risk_model_generation")),
        sa.CheckConstraint("id = 1", name=op.f("ck_risk_model_generation_single_row")),
    )


def downgrade() -> None:
    for table in (
        "risk_model_generation",
        "risk_models",
        "risk_profiles",
        "risk_outcome_reports",
        "risk_transactions",
    ):
        op.drop_table(table)
