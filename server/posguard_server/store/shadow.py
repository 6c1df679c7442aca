"""Shadow scoring: a training run scored alongside the active models, for comparison.

One training run at a time (its one version: the GLOBAL model, if the run trained one, and its CUSTOMER
models) can run in SHADOW: servers score every transaction with it too, answer with the active models,
and store its score next to the transaction for comparison.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update

from posguard_server.domain.errors import FailedPrecondition, NotFound
from posguard_server.domain.risk import ModelRecord, ModelScope, ModelStatus, ShadowPairs
from posguard_server.store.audit import append_event
from posguard_server.store.model_registry import (
    bump_generation,
    lock_registry,
    model_record,
    registry_customer,
    slot_where,
)
from posguard_server.store.risk_tables import (
    FRAUD_LABELS,
    MODELS,
    SqlRiskModel,
    SqlRiskTransaction,
    summed_rowcount,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from posguard_server.store.db import Database


_T = SqlRiskTransaction
_M = SqlRiskModel


class SqlShadowStore:
    """Which run is in shadow, its models, and the pairs of scores it left on transactions."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def set_shadow(self, version: str, *, now: datetime, actor: str | None, reason: str = "") -> int:
        """Run a training run's CANDIDATE models in shadow; returns how many models became SHADOW.

        A run that was in shadow before goes back to CANDIDATE (one shadow run at a time). Models of the
        version that are not CANDIDATEs (ACTIVE, RETIRED) stay as they are. NotFound when no model has this
        version, FailedPrecondition when none of them is a CANDIDATE. Bumps the generation, so servers
        reload; with an ``actor``, a ``model.shadowed`` audit event is appended in the same transaction.
        """
        with self._db.session() as session:
            lock_registry(session, now)
            counts: dict[str, int] = dict(
                session.execute(
                    select(_M.status, func.count()).where(_M.version == version).group_by(_M.status)
                ).all()
            )
            if not counts:
                raise NotFound(
                    "no model has this version", reason="MODEL_NOT_FOUND", metadata={"version": version}
                )
            if not counts.get(ModelStatus.CANDIDATE.value):
                raise FailedPrecondition(
                    "no model of this version is a candidate: only candidates can run in shadow",
                    reason="MODEL_NOT_CANDIDATE",
                    metadata={"version": version},
                )
            previous = _shadow_versions(session)
            session.execute(
                update(MODELS)
                .where(MODELS.c.status == ModelStatus.SHADOW.value, MODELS.c.version != version)
                .values(status=ModelStatus.CANDIDATE.value)
            )
            shadowed = _changed_rows(
                session,
                update(MODELS)
                .where(MODELS.c.version == version, MODELS.c.status == ModelStatus.CANDIDATE.value)
                .values(status=ModelStatus.SHADOW.value),
            )
            bump_generation(session, now)
            if actor is not None:
                details = {
                    "models": str(shadowed),
                    "previous_version": ",".join(v for v in previous if v != version),
                }
                if reason:
                    details["reason"] = reason
                append_event(
                    session, actor=actor, action="model.shadowed", subject=version, details=details, now=now
                )
        return shadowed

    def clear_shadow(self, *, now: datetime, actor: str | None, reason: str = "") -> int:
        """Stop the shadow run: its SHADOW models go back to CANDIDATE; returns how many.

        Nothing in shadow is a no-op (0, no generation bump, no audit event). Otherwise bumps the generation
        and, with an ``actor``, appends a ``model.shadow_cleared`` audit event in the same transaction.
        """
        with self._db.session() as session:
            lock_registry(session, now)
            versions = _shadow_versions(session)
            if not versions:
                return 0
            cleared = _changed_rows(
                session,
                update(MODELS)
                .where(MODELS.c.status == ModelStatus.SHADOW.value)
                .values(status=ModelStatus.CANDIDATE.value),
            )
            bump_generation(session, now)
            if actor is not None:
                details = {"models": str(cleared)}
                if reason:
                    details["reason"] = reason
                append_event(
                    session,
                    actor=actor,
                    action="model.shadow_cleared",
                    subject=",".join(versions),
                    details=details,
                    now=now,
                )
        return cleared

    def shadow_version(self) -> str | None:
        """The version of the run in shadow, or None when none is."""
        with self._db.session(read_only=True) as session:
            return session.scalar(
                select(_M.version).where(_M.status == ModelStatus.SHADOW.value).order_by(_M.id).limit(1)
            )

    def shadow_model(self, scope: ModelScope, customer_id: str) -> ModelRecord | None:
        """The SHADOW model of a scope (and customer) with its artifact, or None."""
        customer = registry_customer(scope, customer_id)
        with self._db.session(read_only=True) as session:
            row = session.scalar(
                select(_M).where(*slot_where(scope.value, customer), _M.status == ModelStatus.SHADOW.value)
            )
            return model_record(row, with_artifact=True) if row is not None else None

    def shadow_pairs(self, version: str) -> ShadowPairs:
        """Every transaction scored while ``version`` ran in shadow: both scores and the fraud label now."""
        query = (
            select(_T.transaction_id, _T.risk_score, _T.shadow_risk_score, _T.outcome)
            .where(_T.shadow_version == version, _T.shadow_risk_score.is_not(None))
            .order_by(_T.id)
        )
        ids: list[str] = []
        active: list[float] = []
        shadow: list[float] = []
        fraud: list[bool] = []
        with self._db.session(read_only=True) as session:
            for transaction_id, risk_score, shadow_risk_score, outcome in session.execute(query):
                # Only scored transactions carry a shadow score, and every scored one has a risk score.
                assert risk_score is not None
                assert shadow_risk_score is not None
                ids.append(transaction_id)
                active.append(risk_score)
                shadow.append(shadow_risk_score)
                fraud.append(outcome in FRAUD_LABELS)
        return ShadowPairs(tuple(ids), tuple(active), tuple(shadow), tuple(fraud))


def _shadow_versions(session: Session) -> list[str]:
    """The versions with models in SHADOW: one, or none (more only if the invariant was broken by hand)."""
    return list(
        session.scalars(
            select(_M.version).distinct().where(_M.status == ModelStatus.SHADOW.value).order_by(_M.version)
        )
    )


def _changed_rows(session: Session, statement: Any) -> int:
    """Run an UPDATE and return how many rows it changed."""
    return summed_rowcount(session.connection().execute(statement).rowcount)
