"""The model registry: trained models by scope, customer and version, and which of them are active.

It keeps at most one ACTIVE model per scope and customer (checked here, and by partial
unique indexes on both backends); every change of an active model bumps a one-row generation counter in the
same transaction, so serving processes notice with one cheap read and reload without a restart. A training
run's models share one version; ``promote`` and ``rollback`` of the GLOBAL scope move the whole run at once,
serialised across processes on the generation row.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.orm import defer

from posguard_server.domain.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from posguard_server.domain.risk import (
    METRIC_AP,
    METRIC_BASELINE_AP,
    Activation,
    ModelRecord,
    ModelScope,
    ModelStatus,
    NewModel,
    Promotion,
    Rollback,
    artifact_digest,
    promotion_refusal,
)
from posguard_server.store.audit import SqlAuditEvent, append_event
from posguard_server.store.idempotency import earlier_call, record_call
from posguard_server.store.risk_tables import (
    CHUNK,
    GENERATION,
    MODELS,
    SqlRiskModel,
    SqlRiskModelGeneration,
    chunks,
    insert_for,
    require_customers,
)
from posguard_server.store.schema import utc

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement
    from sqlalchemy.orm import Session

    from posguard_server.store.db import Database

# The generation counter's only row.
_GENERATION_ID = 1

_M = SqlRiskModel

# (scope, customer_id ("" for GLOBAL), version)
ModelKey = tuple[ModelScope, str, str]


class SqlModelRegistry:
    """Registration, promotion and rollback of models, and the reads a server loads them with."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def add_models(self, models: Sequence[NewModel]) -> None:
        """Register trained models as CANDIDATEs in one transaction; a version taken already is refused."""
        if not models:
            return
        values: list[dict[str, Any]] = []
        keys: set[tuple[str, str | None, str]] = set()
        for model in models:
            customer = registry_customer(model.scope, model.customer_id)
            key = (model.scope.value, customer, model.version)
            if key in keys:
                raise _version_taken(model.version)
            keys.add(key)
            values.append(
                {
                    "scope": model.scope.value,
                    "customer_id": customer,
                    "version": model.version,
                    "status": ModelStatus.CANDIDATE.value,
                    "created_at": model.created_at,
                    "training_window_start": model.training_window_start,
                    "training_window_end": model.training_window_end,
                    "sample_count": model.sample_count,
                    "metrics": _metrics_json(model.metrics),
                    "activated_at": None,
                    "previous_id": None,
                    "artifact": model.artifact,
                    "artifact_sha256": artifact_digest(model.artifact),
                }
            )
        with self._db.session() as session:
            require_customers(session, {v["customer_id"] for v in values if v["customer_id"] is not None})
            # Check everything before inserting anything: a training run's models share one version, so a
            # check after the first chunk's insert would find that chunk.
            for chunk in chunks(sorted({v["version"] for v in values}), CHUNK):
                taken = session.execute(
                    select(_M.scope, _M.customer_id, _M.version).where(_M.version.in_(chunk))
                )
                for scope, customer, version in taken:
                    if (scope, customer, version) in keys:
                        raise _version_taken(version)
            for rows in chunks(values, CHUNK):
                session.execute(insert(MODELS), rows)

    def activate(
        self,
        scope: ModelScope,
        customer_id: str,
        version: str,
        *,
        now: datetime,
        actor: str | None = None,
        reason: str = "",
    ) -> Activation:
        """Make a CANDIDATE or SHADOW version the active one; the previously active one becomes RETIRED.

        Already ACTIVE is a no-op (``changed`` False). NotFound when the version does not exist,
        FailedPrecondition when it is RETIRED (a retired model comes back only by ``rollback``). With an
        ``actor``, a ``model.promoted`` audit event is appended in the same transaction.
        """
        return self.activate_many([(scope, customer_id, version)], now=now, actor=actor, reason=reason)[0]

    def activate_many(
        self, keys: Sequence[ModelKey], *, now: datetime, actor: str | None = None, reason: str = ""
    ) -> list[Activation]:
        """``activate`` for many scopes at once (a training run), in one transaction with one generation bump.

        All or nothing: one missing or retired version refuses the whole call. Each scope and customer may
        appear once.
        """
        wanted: dict[tuple[str, str | None], str] = {}
        for scope, customer_id, version in keys:
            slot = (scope.value, registry_customer(scope, customer_id))
            if slot in wanted:
                raise InvalidArgument.field("models", "name the same scope and customer more than once")
            wanted[slot] = version
        if not wanted:
            return []
        results: list[Activation] = []
        with self._db.session() as session:
            lock_registry(session, now)
            for chunk in chunks(list(wanted.items()), CHUNK):
                results.extend(_activate_chunk(session, chunk, utc(now)))
            if any(result.changed for result in results):
                bump_generation(session, now)
                if actor is not None:
                    for result in results:
                        if result.changed:
                            _audit_model(session, actor, "model.promoted", result, reason, now)
        return results

    def promote(
        self,
        scope: ModelScope,
        customer_id: str,
        version: str,
        *,
        force: bool,
        now: datetime,
        actor: str | None,
        reason: str,
        request_id: str | None = None,
        fingerprint: str = "",
    ) -> Promotion:
        """Make a training run (GLOBAL scope) or one customer's model (CUSTOMER scope) active.

        GLOBAL scope promotes the run ``version``: every CANDIDATE or SHADOW model of it (its GLOBAL model,
        if the run trained one, and all its CUSTOMER models) becomes ACTIVE, each replacing (RETIRED) what
        its slot held; models of the run already ACTIVE or RETIRED stay as they are. The run's models belong
        together (its GLOBAL model is calibrated on the scores of its customer models), so they move in one
        transaction with one generation bump. CUSTOMER scope promotes that customer's model of ``version``.

        Unless ``force``, a promotion ``promotion_refusal`` objects to is refused (FailedPrecondition
        CANDIDATE_NOT_BETTER), judged on the run's GLOBAL model's metrics, or a customer model's for a run
        without one and for CUSTOMER scope (a retrain stores the same run-level evaluation on every model of
        the run), against the latest activation in the registry, and on whether the scope has an active
        model (for a run: the global slot; for a customer-only run: any of its customers' slots).

        NotFound when no model of the scope (and customer) has ``version``; FailedPrecondition
        MODEL_ALREADY_ACTIVE or MODEL_RETIRED when nothing of it is left to promote (or the run's GLOBAL
        model is retired). With an ``actor``, one ``model.promoted`` audit event is appended in the same
        transaction, however many models moved. With a ``request_id`` (and an ``actor``), a retry with the
        same ``request_id`` and ``fingerprint`` changes nothing and answers as the first call did.
        """
        customer = registry_customer(scope, customer_id)
        if request_id is not None and actor is None:
            raise ValueError("an idempotent promotion needs an actor: its answer is kept in the audit log")
        with self._db.session() as session:
            lock_registry(session, now)
            if request_id is not None:
                assert actor is not None
                details = _earlier_registry_call(session, _PROMOTED, actor, request_id, fingerprint)
                if details is not None:
                    return Promotion(
                        version=version,
                        model=_slot_model(session, scope.value, customer, version),
                        previous_version=details.get("previous_version", ""),
                        customer_models=int(details.get("customer_models", "0")),
                        forced=details.get("forced") == "true",
                        overridden=details.get("overridden", ""),
                    )
            query = select(_M).options(defer(_M.artifact)).where(_M.version == version).order_by(_M.id)
            if customer is not None:
                query = query.where(*slot_where(scope.value, customer))
            run = list(session.scalars(query))
            if not run:
                raise NotFound(
                    "no model has this scope, customer and version",
                    reason="MODEL_NOT_FOUND",
                    metadata={"version": version},
                )
            head = next((row for row in run if row.customer_id is None), run[0])
            waiting = [row for row in run if row.status in _PROMOTABLE]
            if head.scope == ModelScope.GLOBAL.value and head.status == ModelStatus.RETIRED.value:
                raise _retired(version)
            if not waiting:
                if any(row.status == ModelStatus.ACTIVE.value for row in run):
                    raise FailedPrecondition(
                        "this version is already active",
                        reason="MODEL_ALREADY_ACTIVE",
                        metadata={"version": version},
                    )
                raise _retired(version)
            metrics = model_record(head, with_artifact=False).metrics
            refusal = promotion_refusal(
                metrics,
                last_activation=_last_activation(session),
                has_active=_has_active(session, scope, head),
            )
            if refusal is not None and not force:
                raise FailedPrecondition(
                    refusal, reason="CANDIDATE_NOT_BETTER", metadata={"version": version}
                )
            keys = [((row.scope, row.customer_id), version) for row in waiting]
            for chunk in chunks(keys, CHUNK):
                _activate_chunk(session, chunk, utc(now))
            bump_generation(session, now)
            # A run without a GLOBAL model has no one model to answer with: the active global model stays.
            named = head.scope == scope.value
            result = Promotion(
                version=version,
                model=model_record(head, with_artifact=False) if named else None,
                previous_version=_previous_version(session, head) if named else "",
                customer_models=sum(1 for row in waiting if row.customer_id is not None),
                forced=force,
                overridden=refusal or "",
            )
            if actor is not None:
                details = {
                    "scope": scope.value,
                    "previous_version": result.previous_version,
                    "customer_models": str(result.customer_models),
                    "forced": "true" if force else "false",
                }
                if result.overridden:
                    details["overridden"] = result.overridden
                for name in (METRIC_AP, METRIC_BASELINE_AP):
                    if name in metrics:
                        details[name] = repr(metrics[name])
                _append_registry_event(
                    session,
                    _PROMOTED,
                    actor,
                    version,
                    customer,
                    details,
                    reason,
                    request_id,
                    fingerprint,
                    now,
                )
            return result

    def rollback(
        self,
        scope: ModelScope,
        customer_id: str,
        *,
        version: str = "",
        now: datetime,
        actor: str | None = None,
        reason: str = "",
        request_id: str | None = None,
        fingerprint: str = "",
    ) -> Rollback:
        """Undo a training run (GLOBAL scope) or one customer's model (CUSTOMER scope).

        GLOBAL scope rolls back the run ``version`` (default: the active global model's): every ACTIVE model
        of it becomes RETIRED and the model it replaced (``previous_id``) ACTIVE again. A CUSTOMER model that
        replaced nothing is retired without a replacement: its customer is scored by the global model alone.
        The run's GLOBAL model, when active, must have replaced one (a registry is never left without a
        global model). ``version`` names a run whose GLOBAL model is not the active one, e.g. an incremental
        run that retrained customer models only. CUSTOMER scope goes back one model for that customer, and
        takes no ``version``. One transaction, one generation bump; repeated rollbacks walk further back.

        FailedPrecondition NO_ACTIVE_MODEL when there is nothing active to roll back (MODEL_NOT_ACTIVE for a
        ``version`` with no active model), NO_PREVIOUS_MODEL when the GLOBAL or customer model replaced
        none; NotFound when no model has ``version``. With an ``actor``, one ``model.rolled_back`` audit
        event is appended in the same transaction; ``request_id`` makes retries replay as in ``promote``.
        """
        customer = registry_customer(scope, customer_id)
        if version and customer is not None:
            raise InvalidArgument.field("version", "is only for the GLOBAL scope: a run is rolled back whole")
        if request_id is not None and actor is None:
            raise ValueError("an idempotent rollback needs an actor: its answer is kept in the audit log")
        with self._db.session() as session:
            lock_registry(session, now)
            if request_id is not None:
                assert actor is not None
                details = _earlier_registry_call(session, _ROLLED_BACK, actor, request_id, fingerprint)
                if details is not None:
                    restored = details.get("restored_version", "")
                    return Rollback(
                        rolled_back_version=details["version"],
                        model=_slot_model(session, scope.value, customer, restored) if restored else None,
                        customer_models_restored=int(details.get("customer_models_restored", "0")),
                        customer_models_retired=int(details.get("customer_models_retired", "0")),
                    )
            active = (_M.id, _M.scope, _M.customer_id, _M.version, _M.previous_id)
            if not version:
                current = session.execute(
                    select(*active).where(
                        *slot_where(scope.value, customer), _M.status == ModelStatus.ACTIVE.value
                    )
                ).first()
                if current is None:
                    raise FailedPrecondition(
                        "there is no active model to roll back", reason="NO_ACTIVE_MODEL"
                    )
                version = current.version
            query = select(*active).where(_M.version == version, _M.status == ModelStatus.ACTIVE.value)
            if customer is not None:
                query = query.where(*slot_where(scope.value, customer))
            rolled = session.execute(query.order_by(_M.id)).all()
            if not rolled:
                if session.scalar(select(_M.id).where(_M.version == version).limit(1)) is None:
                    raise NotFound(
                        "no model has this version", reason="MODEL_NOT_FOUND", metadata={"version": version}
                    )
                raise FailedPrecondition(
                    "no model of this version is active",
                    reason="MODEL_NOT_ACTIVE",
                    metadata={"version": version},
                )
            # The row the answer is about: the GLOBAL model of the run, or the customer's model.
            head = next((row for row in rolled if row.scope == scope.value), None)
            if head is not None and head.previous_id is None:
                raise FailedPrecondition(
                    "the active model replaced no earlier model to roll back to",
                    reason="NO_PREVIOUS_MODEL",
                    metadata={"version": version},
                )
            for chunk in chunks([row.id for row in rolled], CHUNK):
                session.execute(
                    update(MODELS).where(MODELS.c.id.in_(chunk)).values(status=ModelStatus.RETIRED.value)
                )
            # Retire everything first: the partial unique indexes allow one ACTIVE per slot at any moment.
            previous = [row.previous_id for row in rolled if row.previous_id is not None]
            for chunk in chunks(previous, CHUNK):
                session.execute(
                    update(MODELS)
                    .where(MODELS.c.id.in_(chunk))
                    .values(status=ModelStatus.ACTIVE.value, activated_at=utc(now))
                )
            bump_generation(session, now)
            model = None
            if head is not None:
                row = session.scalar(
                    select(_M)
                    .options(defer(_M.artifact))
                    .where(_M.id == head.previous_id)
                    .execution_options(populate_existing=True)
                )
                assert row is not None  # a foreign key
                model = model_record(row, with_artifact=False)
            customers = [row for row in rolled if row.customer_id is not None]
            result = Rollback(
                rolled_back_version=version,
                model=model,
                customer_models_restored=sum(1 for row in customers if row.previous_id is not None),
                customer_models_retired=sum(1 for row in customers if row.previous_id is None),
            )
            if actor is not None:
                details = {
                    "scope": scope.value,
                    "version": version,
                    "restored_version": model.version if model is not None else "",
                    "customer_models_restored": str(result.customer_models_restored),
                    "customer_models_retired": str(result.customer_models_retired),
                }
                _append_registry_event(
                    session,
                    _ROLLED_BACK,
                    actor,
                    version,
                    customer,
                    details,
                    reason,
                    request_id,
                    fingerprint,
                    now,
                )
            return result

    def list_models(
        self,
        *,
        scope: ModelScope | None = None,
        customer_id: str = "",
        version: str = "",
        active_only: bool = False,
        limit: int = 50,
        after_id: int | None = None,
    ) -> tuple[list[ModelRecord], int | None]:
        """One page of models, newest first, without artifacts; and the ``after_id`` of the next page.

        ``customer_id`` "" matches every customer (and GLOBAL models); a customer id matches its models.
        """
        query = select(_M).options(defer(_M.artifact)).order_by(_M.id.desc()).limit(limit + 1)
        if scope is not None:
            query = query.where(_M.scope == scope.value)
        if customer_id:
            query = query.where(_M.customer_id == customer_id)
        if version:
            query = query.where(_M.version == version)
        if active_only:
            query = query.where(_M.status == ModelStatus.ACTIVE.value)
        if after_id is not None:
            query = query.where(_M.id < after_id)
        with self._db.session(read_only=True) as session:
            rows = list(session.scalars(query))
            more = len(rows) > limit
            page = [model_record(row, with_artifact=False) for row in rows[:limit]]
        return page, (page[-1].id if more and page else None)

    def get_model(self, scope: ModelScope, customer_id: str, version: str) -> ModelRecord | None:
        """One version with its artifact, or None."""
        customer = registry_customer(scope, customer_id)
        with self._db.session(read_only=True) as session:
            row = session.scalar(select(_M).where(*slot_where(scope.value, customer), _M.version == version))
            return model_record(row, with_artifact=True) if row is not None else None

    def active_model(self, scope: ModelScope, customer_id: str) -> ModelRecord | None:
        """The active model of a scope (and customer) with its artifact, or None."""
        customer = registry_customer(scope, customer_id)
        with self._db.session(read_only=True) as session:
            row = session.scalar(
                select(_M).where(*slot_where(scope.value, customer), _M.status == ModelStatus.ACTIVE.value)
            )
            return model_record(row, with_artifact=True) if row is not None else None

    def active_models(self, scope: ModelScope | None = None) -> list[ModelRecord]:
        """Every active model (of one scope, when given) with its artifact: what a server loads."""
        query = select(_M).where(_M.status == ModelStatus.ACTIVE.value).order_by(_M.id)
        if scope is not None:
            query = query.where(_M.scope == scope.value)
        with self._db.session(read_only=True) as session:
            return [model_record(row, with_artifact=True) for row in session.scalars(query)]

    def generation(self) -> int:
        """The registry's change counter: it moves whenever an active model changes (0 before the first)."""
        with self._db.session(read_only=True) as session:
            value = session.scalar(
                select(SqlRiskModelGeneration.generation).where(SqlRiskModelGeneration.id == _GENERATION_ID)
            )
            return int(value) if value is not None else 0

    def rolled_back_at(self, version: str) -> datetime | None:
        """When the run ``version`` was last rolled back as a whole, or None if it never was.

        Read from the audit log: RETIRED alone cannot tell a run rolled back from one a later promotion
        replaced. A rollback made without an actor leaves no event (the API and CLI always name one).
        """
        query = (
            select(SqlAuditEvent.occurred_at, SqlAuditEvent.details)
            .where(SqlAuditEvent.action == _ROLLED_BACK, SqlAuditEvent.subject == version)
            .order_by(SqlAuditEvent.sequence.desc())
        )
        with self._db.session(read_only=True) as session:
            for occurred_at, details in session.execute(query):
                # A CUSTOMER-scope rollback of one of the run's models names the run too: not the run's.
                if json.loads(details).get("scope") == ModelScope.GLOBAL.value:
                    return occurred_at
        return None


def registry_customer(scope: ModelScope, customer_id: str) -> str | None:
    """The stored customer_id of a registry scope: NULL for GLOBAL, the customer for CUSTOMER."""
    if scope is ModelScope.GLOBAL:
        if customer_id:
            raise InvalidArgument.field("customer_id", "must be empty for the GLOBAL scope")
        return None
    if scope is ModelScope.CUSTOMER:
        if not customer_id:
            raise InvalidArgument.field("customer_id", "is required for the CUSTOMER scope")
        return customer_id
    raise InvalidArgument.field("scope", "must be CUSTOMER or GLOBAL")


def slot_where(scope: str, customer: str | None) -> list[ColumnElement[bool]]:
    return [_M.scope == scope, _M.customer_id.is_(None) if customer is None else _M.customer_id == customer]


def _version_taken(version: str) -> AlreadyExists:
    return AlreadyExists(
        "this model version is already registered",
        reason="MODEL_VERSION_EXISTS",
        metadata={"version": version},
    )


def _metrics_json(metrics: Mapping[str, float]) -> str:
    return json.dumps({name: float(value) for name, value in metrics.items()}, sort_keys=True)


def model_record(row: SqlRiskModel, *, with_artifact: bool) -> ModelRecord:
    return ModelRecord(
        id=row.id,
        scope=ModelScope(row.scope),
        customer_id=row.customer_id or "",
        version=row.version,
        status=ModelStatus(row.status),
        created_at=row.created_at,
        training_window_start=row.training_window_start,
        training_window_end=row.training_window_end,
        sample_count=row.sample_count,
        metrics={name: float(value) for name, value in json.loads(row.metrics).items()},
        activated_at=row.activated_at,
        artifact=row.artifact if with_artifact else None,
        artifact_sha256=row.artifact_sha256,
    )


def lock_registry(session: Session, now: datetime) -> None:
    """Serialise registry changes across replicas on the generation row (created on first use)."""
    dialect_insert = insert_for(session)
    session.execute(
        dialect_insert(GENERATION)
        .values(id=_GENERATION_ID, generation=0, changed_at=utc(now))
        .on_conflict_do_nothing(index_elements=["id"])
    )
    session.execute(
        select(SqlRiskModelGeneration.id).where(SqlRiskModelGeneration.id == _GENERATION_ID).with_for_update()
    )


def bump_generation(session: Session, now: datetime) -> None:
    session.execute(
        update(GENERATION)
        .where(GENERATION.c.id == _GENERATION_ID)
        .values(generation=GENERATION.c.generation + 1, changed_at=utc(now))
    )


def _activate_chunk(
    session: Session, chunk: Sequence[tuple[tuple[str, str | None], str]], now: datetime
) -> list[Activation]:
    """Activate one chunk of (scope slot → version): one read for the chunk, then batched updates."""
    customers = {customer for (_, customer), _ in chunk if customer is not None}
    owners: list[ColumnElement[bool]] = []
    if customers:
        owners.append(_M.customer_id.in_(customers))
    if any(customer is None for (_, customer), _ in chunk):
        owners.append(_M.customer_id.is_(None))
    rows = session.scalars(
        select(_M)
        .options(defer(_M.artifact))
        .where(
            or_(*owners), or_(_M.version.in_({v for _, v in chunk}), _M.status == ModelStatus.ACTIVE.value)
        )
    )
    by_version: dict[tuple[str, str | None, str], SqlRiskModel] = {}
    active: dict[tuple[str, str | None], SqlRiskModel] = {}
    for row in rows:
        by_version[(row.scope, row.customer_id, row.version)] = row
        if row.status == ModelStatus.ACTIVE.value:
            active[(row.scope, row.customer_id)] = row
    plan: list[tuple[SqlRiskModel, SqlRiskModel | None]] = []
    results: list[Activation] = []
    for (scope, customer), version in chunk:
        target = by_version.get((scope, customer, version))
        if target is None:
            raise NotFound(
                "no model has this scope, customer and version",
                reason="MODEL_NOT_FOUND",
                metadata={"version": version},
            )
        if target.status == ModelStatus.RETIRED.value:
            raise FailedPrecondition(
                "a retired model cannot be promoted again; roll back instead",
                reason="MODEL_RETIRED",
                metadata={"version": version},
            )
        if target.status == ModelStatus.ACTIVE.value:
            results.append(Activation(model_record(target, with_artifact=False), "", changed=False))
            continue
        plan.append((target, active.get((scope, customer))))
    for _, current in plan:
        if current is not None:
            current.status = ModelStatus.RETIRED.value
    # Retire first: the partial unique index allows one ACTIVE per scope and customer at any moment.
    session.flush()
    for target, current in plan:
        target.status = ModelStatus.ACTIVE.value
        target.activated_at = now
        target.previous_id = current.id if current is not None else None
    session.flush()
    results.extend(
        Activation(
            model_record(target, with_artifact=False),
            current.version if current is not None else "",
            changed=True,
        )
        for target, current in plan
    )
    return results


def _audit_model(
    session: Session, actor: str, action: str, result: Activation, reason: str, now: datetime
) -> None:
    details = {"scope": result.model.scope.value, "previous_version": result.previous_version}
    if result.model.customer_id:
        details["customer_id"] = result.model.customer_id
    if reason:
        details["reason"] = reason
    append_event(session, actor=actor, action=action, subject=result.model.version, details=details, now=now)


# Audit actions of the registry, also the idempotency methods of PromoteModel and RollbackModel.
_PROMOTED = "model.promoted"
_ROLLED_BACK = "model.rolled_back"
_PROMOTABLE = (ModelStatus.CANDIDATE.value, ModelStatus.SHADOW.value)


def _retired(version: str) -> FailedPrecondition:
    return FailedPrecondition(
        "a retired model cannot be promoted again; roll back instead",
        reason="MODEL_RETIRED",
        metadata={"version": version},
    )


def _last_activation(session: Session) -> datetime | None:
    """When a model last became active (promotion or rollback); None before the first."""
    value: datetime | None = session.scalar(select(func.max(_M.activated_at)))
    if value is None:
        return None
    # An aggregate skips the column type's conversion on some backends: read a naive value as UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _has_active(session: Session, scope: ModelScope, head: SqlRiskModel) -> bool:
    """Whether what a promotion would replace has an active model: the slot of ``head`` (the run's GLOBAL
    model, or the customer's model), or, for a run without a GLOBAL model, any of its customers' slots."""
    if head.customer_id is None or scope is ModelScope.CUSTOMER:
        conditions = slot_where(head.scope, head.customer_id)
    else:
        run_customers = select(_M.customer_id).where(
            _M.version == head.version, _M.scope == ModelScope.CUSTOMER.value
        )
        conditions = [_M.scope == ModelScope.CUSTOMER.value, _M.customer_id.in_(run_customers)]
    found = session.scalar(select(_M.id).where(*conditions, _M.status == ModelStatus.ACTIVE.value).limit(1))
    return found is not None


def _previous_version(session: Session, row: SqlRiskModel) -> str:
    """The version of the model ``row`` replaced when it was activated ("" when it replaced none)."""
    if row.previous_id is None:
        return ""
    return session.scalar(select(_M.version).where(_M.id == row.previous_id)) or ""


def _slot_model(session: Session, scope: str, customer: str | None, version: str) -> ModelRecord | None:
    """A replayed answer's model, as it is now (None for a run without a model in ``scope``)."""
    row = session.scalar(
        select(_M).options(defer(_M.artifact)).where(*slot_where(scope, customer), _M.version == version)
    )
    return model_record(row, with_artifact=False) if row is not None else None


def _earlier_registry_call(
    session: Session, method: str, caller: str, request_id: str, fingerprint: str
) -> dict[str, str] | None:
    """The audit details of the caller's earlier call with this ``request_id`` (its answer), or None.

    The answer is kept where the call already wrote it, in its audit event (with the request_id among the
    details); the idempotency key finds the event by its time and actor. Another request under the same
    request_id is an InvalidArgument.
    """
    done = earlier_call(session, method, caller, request_id, fingerprint)
    if done is None:
        return None
    events = session.scalars(
        select(SqlAuditEvent.details)
        .where(
            SqlAuditEvent.action == method,
            SqlAuditEvent.actor == caller,
            SqlAuditEvent.occurred_at == done.created_at,
        )
        .order_by(SqlAuditEvent.sequence)
    )
    for text_ in events:
        details = json.loads(text_)
        if isinstance(details, dict) and details.get("request_id") == request_id:
            return {str(key): str(value) for key, value in details.items()}
    raise RuntimeError(f"the audit event of {method} request {request_id!r} is missing")


def _append_registry_event(
    session: Session,
    method: str,
    actor: str,
    version: str,
    customer: str | None,
    details: dict[str, str],
    reason: str,
    request_id: str | None,
    fingerprint: str,
    now: datetime,
) -> None:
    """The one audit event of a promotion or rollback; with a ``request_id``, its idempotency key too."""
    if customer is not None:
        details["customer_id"] = customer
    if reason:
        details["reason"] = reason
    if request_id is not None:
        details["request_id"] = request_id
        record_call(session, method, actor, request_id, fingerprint, customer_id=customer or "", now=utc(now))
    append_event(session, actor=actor, action=method, subject=version, details=details, now=now)
