"""Customers: numbers with their lifecycle, per-prefix counters, external IDs, verification failures and
idempotency keys of lifecycle calls.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 00:00:00+00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "number_counters",
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("next_value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("prefix", name=op.f("pk_number_counters")),
    )
    op.create_table(
        "customers",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("customer_id", sa.String(32), nullable=False),
        sa.Column("issuer", sa.String(32), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("holder_ciphertext", sa.LargeBinary(), nullable=True),
        sa.Column("holder_key_version", sa.Integer(), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("request_fingerprint", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_customers")),
        sa.UniqueConstraint("customer_id", name=op.f("uq_customers_customer_id")),
        sa.UniqueConstraint("request_id", name=op.f("uq_customers_request_id")),
    )
    op.create_index(op.f("ix_customers_issuer"), "customers", ["issuer"])
    op.create_index(op.f("ix_customers_created_at"), "customers", ["created_at"])
    op.create_table(
        "customer_numbers",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("number", sa.String(40), nullable=False),
        sa.Column("customer_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("issuer", sa.String(32), nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("counter", sa.BigInteger(), nullable=False),
        sa.Column("key_version", sa.Integer(), nullable=False),
        sa.Column("issued_at", _TIME, nullable=False),
        sa.Column("status_changed_at", _TIME, nullable=False),
        sa.Column("status_changed_by", sa.String(64), nullable=False),
        sa.Column("status_reason", sa.String(500), nullable=False),
        sa.Column("successor_number", sa.String(40), nullable=True),
        sa.Column("primary_number", sa.String(40), nullable=True),
        sa.Column("scope_merchant_id", sa.String(64), nullable=True),
        sa.Column("scope_channel", sa.String(16), nullable=True),
        sa.Column("label", sa.String(100), nullable=True),
        sa.Column("verifications", sa.BigInteger(), nullable=False),
        sa.Column("failed_verifications", sa.BigInteger(), nullable=False),
        sa.Column("last_verified_at", _TIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_customer_numbers")),
        sa.UniqueConstraint("number", name=op.f("uq_customer_numbers_number")),
        sa.ForeignKeyConstraint(
            ["customer_id"],
            ["customers.customer_id"],
            name=op.f("fk_customer_numbers_customer_id_customers"),
        ),
        # Frozen here on purpose: a migration must not change when the code does.
        sa.CheckConstraint(
            "status IN ('active', 'suspended', 'revoked', 'rotated')", name=op.f("ck_customer_numbers_status")
        ),
        sa.CheckConstraint("kind IN ('static', 'sub')", name=op.f("ck_customer_numbers_kind")),
    )
    op.create_index(op.f("ix_customer_numbers_customer_id"), "customer_numbers", ["customer_id"])
    op.create_index(op.f("ix_customer_numbers_status"), "customer_numbers", ["status"])
    op.create_table(
        "external_ids",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("namespace", sa.String(64), nullable=False),
        sa.Column("value", sa.String(256), nullable=False),
        sa.Column("customer_id", sa.String(32), nullable=False),
        sa.Column("linked_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_external_ids")),
        sa.UniqueConstraint("namespace", "value", name=op.f("uq_external_ids_namespace")),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.customer_id"], name=op.f("fk_external_ids_customer_id_customers")
        ),
    )
    op.create_index(op.f("ix_external_ids_customer_id"), "external_ids", ["customer_id"])
    op.create_table(
        "verification_failures",
        sa.Column("scope", sa.String(8), nullable=False),
        sa.Column("subject", sa.String(40), nullable=False),
        sa.Column("failures", sa.BigInteger(), nullable=False),
        sa.Column("last_failed_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("scope", "subject", name=op.f("pk_verification_failures")),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("method", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("customer_id", sa.String(32), nullable=False),
        sa.Column("result_number", sa.String(40), nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("method", "request_id", name=op.f("pk_idempotency_keys")),
    )


def downgrade() -> None:
    for table in (
        "idempotency_keys",
        "verification_failures",
        "external_ids",
        "customer_numbers",
        "customers",
        "number_counters",
    ):
        op.drop_table(table)
