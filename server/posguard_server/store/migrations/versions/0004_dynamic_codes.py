"""Dynamic codes: enrolments with their encrypted keys, used codes and redemption attempts.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 00:00:00+00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "dynamic_enrollments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("customer_id", sa.String(32), nullable=False),
        sa.Column("handle", sa.String(10), nullable=False),
        sa.Column("secret_ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("key_version", sa.Integer(), nullable=False),
        sa.Column("enrolled_at", _TIME, nullable=False),
        sa.Column("enrolled_by", sa.String(64), nullable=False),
        sa.Column("refusals", sa.BigInteger(), nullable=False),
        sa.Column("replays", sa.BigInteger(), nullable=False),
        sa.Column("last_refused_at", _TIME, nullable=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("request_fingerprint", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dynamic_enrollments")),
        sa.UniqueConstraint("customer_id", name=op.f("uq_dynamic_enrollments_customer_id")),
        sa.UniqueConstraint("handle", name=op.f("uq_dynamic_enrollments_handle")),
        sa.UniqueConstraint("request_id", name=op.f("uq_dynamic_enrollments_request_id")),
        sa.ForeignKeyConstraint(
            ["customer_id"],
            ["customers.customer_id"],
            name=op.f("fk_dynamic_enrollments_customer_id_customers"),
        ),
    )
    op.create_table(
        "dynamic_code_uses",
        sa.Column("handle", sa.String(10), nullable=False),
        sa.Column("step", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("customer_id", sa.String(32), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("used_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("handle", "step", name=op.f("pk_dynamic_code_uses")),
    )
    op.create_table(
        "dynamic_code_attempts",
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(24), nullable=False),
        sa.Column("handle", sa.String(10), nullable=True),
        sa.Column("step", sa.BigInteger(), nullable=True),
        sa.Column("customer_id", sa.String(32), nullable=True),
        sa.Column("number", sa.String(40), nullable=True),
        sa.Column("merchant_id", sa.String(64), nullable=False),
        sa.Column("terminal_id", sa.String(64), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=True),
        sa.Column("currency", sa.String(3), nullable=True),
        sa.Column("attempted_at", _TIME, nullable=False),
        sa.Column("attempted_by", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_dynamic_code_attempts")),
        # Frozen here on purpose: a migration must not change when the code does.
        sa.CheckConstraint(
            "reason IN ('ok', 'malformed', 'expired', 'already_used', 'wrong_customer', 'not_enrolled', "
            "'number_not_active', 'unknown_code')",
            name=op.f("ck_dynamic_code_attempts_reason"),
        ),
    )
    op.create_index(op.f("ix_dynamic_code_attempts_handle"), "dynamic_code_attempts", ["handle"])
    op.create_index(op.f("ix_dynamic_code_attempts_attempted_at"), "dynamic_code_attempts", ["attempted_at"])


def downgrade() -> None:
    for table in ("dynamic_code_attempts", "dynamic_code_uses", "dynamic_enrollments"):
        op.drop_table(table)
