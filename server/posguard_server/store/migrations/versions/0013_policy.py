"""Lists and rules: named lists of values with their entries, versioned rules, and a generation counter that
servers poll to reload them.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-14 00:00:00+00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "policy_lists",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("type", sa.String(8), nullable=False),
        sa.Column("description", sa.String(500), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_lists")),
        sa.UniqueConstraint("name", name=op.f("uq_policy_lists_name")),
        # Frozen here on purpose: a migration must not change when the code does.
        sa.CheckConstraint(
            "kind IN ('customer', 'number', 'external_id', 'merchant', 'terminal', 'mcc')",
            name=op.f("ck_policy_lists_kind"),
        ),
        sa.CheckConstraint("type IN ('deny', 'allow')", name=op.f("ck_policy_lists_type")),
    )
    op.create_table(
        "policy_list_entries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("list_id", sa.Integer(), nullable=False),
        sa.Column("value", sa.String(128), nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("author", sa.String(64), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("expires_at", _TIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_list_entries")),
        sa.UniqueConstraint("list_id", "value", name=op.f("uq_policy_list_entries_list_id")),
        sa.ForeignKeyConstraint(
            ["list_id"], ["policy_lists.id"], name=op.f("fk_policy_list_entries_list_id_policy_lists")
        ),
    )
    op.create_table(
        "policy_rules",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("condition", sa.Text(), nullable=False),
        sa.Column("action", sa.String(8), nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("activated_at", _TIME, nullable=True),
        sa.Column("retired_at", _TIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_rules")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_policy_rules_name")),
        sa.CheckConstraint("status IN ('DRAFT', 'ACTIVE', 'RETIRED')", name=op.f("ck_policy_rules_status")),
        sa.CheckConstraint("action IN ('DECLINE', 'REVIEW', 'REASON')", name=op.f("ck_policy_rules_action")),
    )
    op.create_index("ix_policy_rules_status", "policy_rules", ["status"])
    op.create_table(
        "policy_generation",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("changed_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_generation")),
        sa.CheckConstraint("id = 1", name=op.f("ck_policy_generation_single_row")),
    )


def downgrade() -> None:
    op.drop_table("policy_generation")
    op.drop_index("ix_policy_rules_status", table_name="policy_rules")
    op.drop_table("policy_rules")
    op.drop_table("policy_list_entries")
    op.drop_table("policy_lists")
