"""Idempotency keys belong to their caller: a request_id is unique per API key, not across the service.

Every table that answers a retry by its request_id gets the caller in its key: ``idempotency_keys.caller``
and ``risk_outcome_reports.caller`` (new), ``dynamic_code_attempts.attempted_by``, ``customers.created_by``
and ``api_keys.created_by`` (already there). Enrolments and scores keep their keys in ``idempotency_keys``
from now on (an enrolment's own request_id is overwritten when it is replaced, a score's was kept only on the
transaction it stored), so their request_id columns are no longer unique.

Existing rows keep the caller that is on record: the creator of a customer or an API key, the redeemer of a
code, the enroller of the current enrolment (copied into ``idempotency_keys``), and for the other
``idempotency_keys`` the actor of the audit event the call appended at the same moment. Where none is on
record (outcome reports, and a key whose call appended no event) the caller is '', which no caller matches:
a retry of such a call that spans the upgrade is answered as a new call.

Downgrading fails if two callers have used the same request_id for one method since: the old schema cannot
hold both.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-11 00:00:00+00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

_CALLER = sa.String(64)


def upgrade() -> None:
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.add_column(sa.Column("caller", _CALLER, nullable=False, server_default=""))
    # Each of these calls appended one audit event, of its method, at the moment its key was made.
    op.execute(
        "UPDATE idempotency_keys SET caller = COALESCE(("
        "SELECT a.actor FROM audit_events a WHERE a.action = idempotency_keys.method "
        "AND a.occurred_at = idempotency_keys.created_at ORDER BY a.sequence LIMIT 1), '')"
    )
    # The current enrolments' keys; the request ids of replaced ones were lost with them.
    op.execute(
        "INSERT INTO idempotency_keys "
        "(method, request_id, caller, fingerprint, customer_id, result_number, created_at) "
        "SELECT 'dynamic_code.enrolled', request_id, enrolled_by, request_fingerprint, customer_id, NULL, "
        "enrolled_at "
        "FROM dynamic_enrollments"
    )
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.alter_column("caller", existing_type=_CALLER, existing_nullable=False, server_default=None)
        batch.drop_constraint("pk_idempotency_keys", type_="primary")
        batch.create_primary_key("pk_idempotency_keys", ["method", "request_id", "caller"])

    with op.batch_alter_table("risk_outcome_reports") as batch:
        batch.add_column(sa.Column("caller", _CALLER, nullable=False, server_default=""))
    with op.batch_alter_table("risk_outcome_reports") as batch:
        batch.alter_column("caller", existing_type=_CALLER, existing_nullable=False, server_default=None)
        batch.drop_constraint("pk_risk_outcome_reports", type_="primary")
        batch.create_primary_key("pk_risk_outcome_reports", ["request_id", "caller"])

    with op.batch_alter_table("dynamic_code_attempts") as batch:
        batch.drop_constraint("pk_dynamic_code_attempts", type_="primary")
        batch.create_primary_key("pk_dynamic_code_attempts", ["request_id", "attempted_by"])

    for table, creator in (("customers", "created_by"), ("api_keys", "created_by")):
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"uq_{table}_request_id", type_="unique")
            batch.create_unique_constraint(f"uq_{table}_request_id", ["request_id", creator])
    for table in ("dynamic_enrollments", "risk_transactions"):
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"uq_{table}_request_id", type_="unique")


def downgrade() -> None:
    for table in ("dynamic_enrollments", "risk_transactions"):
        with op.batch_alter_table(table) as batch:
            batch.create_unique_constraint(f"uq_{table}_request_id", ["request_id"])
    for table in ("customers", "api_keys"):
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"uq_{table}_request_id", type_="unique")
            batch.create_unique_constraint(f"uq_{table}_request_id", ["request_id"])

    with op.batch_alter_table("dynamic_code_attempts") as batch:
        batch.drop_constraint("pk_dynamic_code_attempts", type_="primary")
        batch.create_primary_key("pk_dynamic_code_attempts", ["request_id"])

    with op.batch_alter_table("risk_outcome_reports") as batch:
        batch.drop_constraint("pk_risk_outcome_reports", type_="primary")
        batch.drop_column("caller")
        batch.create_primary_key("pk_risk_outcome_reports", ["request_id"])

    # Keys only this revision keeps: the old schema finds enrolments and scores by their own columns.
    op.execute(
        "DELETE FROM idempotency_keys "
        "WHERE method IN ('dynamic_code.enrolled', 'risk.scored', 'api_key.revoked')"
    )
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.drop_constraint("pk_idempotency_keys", type_="primary")
        batch.drop_column("caller")
        batch.create_primary_key("pk_idempotency_keys", ["method", "request_id"])
