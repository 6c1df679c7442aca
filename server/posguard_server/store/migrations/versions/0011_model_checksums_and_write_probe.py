"""Model artifacts carry a SHA-256 checksum, computed here for the ones already stored; a one-row table that
servers write to find out whether the database still takes writes.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-10 00:00:00+00:00
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

_TIME = sa.DateTime(timezone=True)
# Artifacts read at a time while their checksums are computed: a bounded amount of memory.
_CHUNK = 100

_models = sa.table(
    "risk_models",
    sa.column("id", sa.Integer()),
    sa.column("artifact", sa.LargeBinary()),
    sa.column("artifact_sha256", sa.String(64)),
)


def upgrade() -> None:
    with op.batch_alter_table("risk_models") as batch:
        batch.add_column(sa.Column("artifact_sha256", sa.String(64), nullable=True))
    # The artifacts stored before checksums existed get theirs from their bytes as they are now: the
    # structure checks of loading are what stands behind them, from here on the checksum sees any change.
    bind = op.get_bind()
    after = 0
    while True:
        rows = bind.execute(
            sa.select(_models.c.id, _models.c.artifact)
            .where(_models.c.id > after)
            .order_by(_models.c.id)
            .limit(_CHUNK)
        ).all()
        if not rows:
            break
        bind.execute(
            sa.update(_models)
            .where(_models.c.id == sa.bindparam("b_id"))
            .values(artifact_sha256=sa.bindparam("b_sha256")),
            [{"b_id": id_, "b_sha256": hashlib.sha256(artifact).hexdigest()} for id_, artifact in rows],
        )
        after = rows[-1][0]
    with op.batch_alter_table("risk_models") as batch:
        batch.alter_column("artifact_sha256", existing_type=sa.String(64), nullable=False)
    op.create_table(
        "write_probe",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("probed_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_write_probe")),
        sa.CheckConstraint("id = 1", name=op.f("ck_write_probe_single_row")),
    )


def downgrade() -> None:
    op.drop_table("write_probe")
    with op.batch_alter_table("risk_models") as batch:
        batch.drop_column("artifact_sha256")
