"""Storage of transaction risk: imported history, customer profiles, outcome labels and the model registry.
Scoring writes are in ``scoring_writes``, the tables in ``risk_tables``.

The model registry keeps at most one ACTIVE model per scope and customer (checked here, and by partial
unique indexes on both backends); every change of an active model bumps a one-row generation counter in the
same transaction, so serving processes notice with one cheap read and reload without a restart. A training
run's models share one version; ``promote`` and ``rollback`` of the GLOBAL scope move the whole run at once,
serialised across processes on the generation row.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, bindparam, case, distinct, func, insert, or_, select, update
from sqlalchemy.orm import defer

from posguard_server.domain.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from posguard_server.domain.risk import (
    METRIC_AP,
    METRIC_BASELINE_AP,
    Activation,
    Channel,
    Decision,
    HistoryBatch,
    LabelledTransaction,
    ModelRecord,
    ModelScope,
    ModelStatus,
    NewModel,
    NewTransaction,
    Outcome,
    OutcomeRecord,
    ProfileSnapshot,
    ProfileSummary,
    Promotion,
    Rollback,
    ShadowPairs,
    TransactionSource,
    promotion_refusal,
)
from posguard_server.store.audit import SqlAuditEvent, append_event
from posguard_server.store.customers import SqlIdempotencyKey
from posguard_server.store.risk_tables import (
    ATTEMPTS,
    CHUNK,
    FRAUD_LABELS,
    GENERATION,
    MODELS,
    PROFILES,
    TRANSACTIONS,
    SqlRiskModel,
    SqlRiskModelGeneration,
    SqlRiskOutcomeReport,
    SqlRiskProfile,
    SqlRiskTransaction,
    chunks,
    insert_for,
    profile_snapshot,
    request_conflict,
    require_customers,
    summed_rowcount,
    transaction_values,
    utc,
)

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement
    from sqlalchemy.orm import Session

    from posguard_server.store.db import Database

_HISTORY_BATCH_ROWS = 50_000
# The generation counter's only row.
_GENERATION_ID = 1

_T = SqlRiskTransaction
_M = SqlRiskModel

# What a history batch carries, in this order; the id is only the keyset-pagination tie breaker.
_HISTORY_COLUMNS = (
    _T.id,
    _T.transaction_id,
    _T.customer_id,
    _T.event_time,
    _T.amount_minor,
    _T.currency,
    _T.merchant_id,
    _T.terminal_id,
    _T.mcc,
    _T.channel,
    _T.latitude,
    _T.longitude,
    _T.outcome,
    _T.outcome_at,
)

# (scope, customer_id ("" for GLOBAL), version)
ModelKey = tuple[ModelScope, str, str]


class SqlRiskStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    # -- history --------------------------------------------------------------------------------------

    def import_transactions(self, rows: Sequence[NewTransaction]) -> int:
        """Store history in one transaction, skipping transaction ids already stored; returns the new count.

        Idempotent, so an interrupted import can simply be run again. Every customer must exist.
        """
        unique: dict[str, NewTransaction] = {}
        for row in rows:
            # The first occurrence wins, as it would have if the rows had come in two imports.
            unique.setdefault(row.transaction_id, row)
        if not unique:
            return 0
        added = 0
        with self._db.session() as session:
            require_customers(session, {row.customer_id for row in unique.values()})
            # ON CONFLICT rather than a read of the ids first: a statement PostgreSQL prepared while the
            # table was small keeps its plan, a scan, for the rest of a long import.
            statement = (
                insert_for(session)(TRANSACTIONS)
                .on_conflict_do_nothing(index_elements=["transaction_id"])
                .execution_options(preserve_rowcount=True)
            )
            connection = session.connection()
            for chunk in chunks(list(unique.values()), CHUNK):
                values = [transaction_values(row, TransactionSource.IMPORT, in_history=True) for row in chunk]
                # A plain executemany (no RETURNING) is the fastest path on both drivers, and both sum its
                # row counts: skipped rows count 0.
                added += summed_rowcount(connection.execute(statement, values).rowcount)
        return added

    def history(
        self,
        *,
        customer_ids: Sequence[str] | None = None,
        until: datetime | None = None,
        exclude_labelled_fraud: bool = True,
        labels_known_at: datetime | None = None,
        batch_rows: int = _HISTORY_BATCH_ROWS,
    ) -> Iterator[HistoryBatch]:
        """Stream stored transactions ordered by (customer_id, event_time, id), whole customers per batch.

        Only transactions that count in history, with ``event_time`` strictly before ``until`` when given.
        With ``exclude_labelled_fraud``, transactions labelled FRAUD or CHARGEBACK are left out (only those
        labelled at or before ``labels_known_at`` when it is given). A batch holds about ``batch_rows`` rows,
        more when one customer alone has more. Each page is read in a short transaction of its own, so a slow
        consumer never holds the database open.
        """
        if batch_rows < 1:
            raise ValueError("batch_rows must be positive")
        conditions: list[ColumnElement[bool]] = [_T.in_history.is_(True)]
        if until is not None:
            conditions.append(_T.event_time < until)
        if exclude_labelled_fraud:
            labelled: ColumnElement[bool] = _T.outcome.in_(FRAUD_LABELS)
            if labels_known_at is not None:
                labelled = and_(labelled, _T.outcome_at <= labels_known_at)
            conditions.append(or_(_T.outcome.is_(None), ~labelled))
        if customer_ids is None:
            groups: Iterable[list[ColumnElement[bool]]] = [conditions]
        else:
            wanted = sorted(set(customer_ids))
            groups = ([*conditions, _T.customer_id.in_(chunk)] for chunk in chunks(wanted, CHUNK))
        pending: list[Any] = []
        for group in groups:
            for page in self._customer_pages(group, batch_rows):
                pending.extend(page)
                if len(pending) >= batch_rows:
                    yield _history_batch(pending)
                    pending = []
        if pending:
            yield _history_batch(pending)

    def _customer_pages(self, conditions: list[ColumnElement[bool]], page_rows: int) -> Iterator[list[Any]]:
        """Rows matching ``conditions`` in history order, in pages that each end with a whole customer."""
        ordered = select(*_HISTORY_COLUMNS).where(*conditions).order_by(_T.customer_id, _T.event_time, _T.id)
        after: str | None = None
        while True:
            query = ordered.limit(page_rows)
            if after is not None:
                query = query.where(_T.customer_id > after)
            with self._db.session(read_only=True) as session:
                rows: list[Any] = list(session.execute(query))
            if len(rows) < page_rows:
                if rows:
                    yield rows
                return
            last = rows[-1].customer_id
            cut = len(rows)
            while cut > 0 and rows[cut - 1].customer_id == last:
                cut -= 1
            if cut > 0:
                # The page may end inside a customer: leave that customer whole for the next page.
                yield rows[:cut]
                after = rows[cut - 1].customer_id
                continue
            # One customer fills the whole page: read the rest of that customer before moving on.
            yield rows + self._rest_of_customer(ordered, last, rows[-1], page_rows)
            after = last

    def _rest_of_customer(self, ordered: Any, customer_id: str, last: Any, page_rows: int) -> list[Any]:
        rest: list[Any] = []
        while True:
            query = ordered.where(
                _T.customer_id == customer_id,
                or_(_T.event_time > last.event_time, and_(_T.event_time == last.event_time, _T.id > last.id)),
            ).limit(page_rows)
            with self._db.session(read_only=True) as session:
                rows: list[Any] = list(session.execute(query))
            rest.extend(rows)
            if len(rows) < page_rows:
                return rest
            last = rows[-1]

    # -- profiles -------------------------------------------------------------------------------------

    def profile(self, customer_id: str) -> ProfileSnapshot | None:
        with self._db.session(read_only=True) as session:
            row = session.get(SqlRiskProfile, customer_id)
            return profile_snapshot(row) if row is not None else None

    def put_profiles(self, profiles: Sequence[tuple[str, ProfileSnapshot]], *, now: datetime) -> None:
        """Insert or replace customers' profiles in one transaction (rebuilding them after an import)."""
        latest = dict(profiles)
        if not latest:
            return
        with self._db.session() as session:
            require_customers(session, set(latest))
            dialect_insert = insert_for(session)
            statement = dialect_insert(PROFILES)
            statement = statement.on_conflict_do_update(
                index_elements=["customer_id"],
                set_={
                    name: statement.excluded[name]
                    for name in (
                        "state",
                        "transaction_count",
                        "first_seen",
                        "last_seen",
                        "declines",
                        "reviews",
                        "updated_at",
                    )
                },
            )
            items = list(latest.items())
            for chunk in chunks(items, CHUNK):
                session.execute(
                    statement,
                    [
                        {
                            "customer_id": customer_id,
                            "state": snap.state,
                            "transaction_count": snap.transaction_count,
                            "first_seen": snap.first_seen,
                            "last_seen": snap.last_seen,
                            "declines": snap.declines,
                            "reviews": snap.reviews,
                            "updated_at": now,
                        }
                        for customer_id, snap in chunk
                    ],
                )

    def profile_summary(self, customer_id: str) -> ProfileSummary:
        """Counts over the customer's stored transactions (all zero for a customer without any)."""
        counted = _T.in_history.is_(True)
        with self._db.session(read_only=True) as session:
            totals = session.execute(
                select(
                    func.count(case((counted, 1))),
                    func.min(case((counted, _T.event_time))),
                    func.max(case((counted, _T.event_time))),
                    func.count(case((_T.decision == Decision.DECLINE.value, 1))),
                    func.count(case((_T.decision == Decision.REVIEW.value, 1))),
                    func.count(distinct(case((counted, _T.merchant_id)))),
                    func.count(distinct(case((and_(counted, _T.terminal_id != ""), _T.terminal_id)))),
                ).where(_T.customer_id == customer_id)
            ).one()
            count, first_seen, last_seen, declines, reviews, merchants, terminals = totals
            typical: int | None = None
            currency = ""
            if count:
                currency, in_currency = session.execute(
                    select(_T.currency, func.count())
                    .where(_T.customer_id == customer_id, counted)
                    .group_by(_T.currency)
                    .order_by(func.count().desc(), _T.currency)
                    .limit(1)
                ).one()
                # The lower median by OFFSET over the sorted amounts: SQLite has no percentile function.
                typical = session.scalar(
                    select(_T.amount_minor)
                    .where(_T.customer_id == customer_id, counted, _T.currency == currency)
                    .order_by(_T.amount_minor)
                    .offset((int(in_currency) - 1) // 2)
                    .limit(1)
                )
        return ProfileSummary(
            transaction_count=int(count),
            first_seen=first_seen,
            last_seen=last_seen,
            declines=int(declines),
            reviews=int(reviews),
            distinct_merchants=int(merchants),
            distinct_terminals=int(terminals),
            typical_amount_minor=typical,
            typical_currency=currency,
        )

    # -- outcomes -------------------------------------------------------------------------------------

    def report_outcome(
        self,
        transaction_id: str,
        outcome: Outcome,
        *,
        reported_at: datetime,
        note: str,
        request_id: str,
        fingerprint: str,
        now: datetime,
    ) -> tuple[OutcomeRecord, bool]:
        """Label a stored transaction; ``(record, replayed)``.

        A later report (another request_id) replaces the label: a chargeback can follow a legitimate. A
        retry with the same ``request_id`` and ``fingerprint`` returns what that report set and changes
        nothing, even after a later report replaced its label.
        """
        for attempt in range(ATTEMPTS):
            try:
                return self._report_once(
                    transaction_id,
                    outcome,
                    reported_at=reported_at,
                    note=note,
                    request_id=request_id,
                    fingerprint=fingerprint,
                    now=now,
                )
            except AlreadyExists:
                # The same request_id committed concurrently: the re-run replays it.
                if attempt == ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _report_once(
        self,
        transaction_id: str,
        outcome: Outcome,
        *,
        reported_at: datetime,
        note: str,
        request_id: str,
        fingerprint: str,
        now: datetime,
    ) -> tuple[OutcomeRecord, bool]:
        with self._db.session() as session:
            earlier = session.get(SqlRiskOutcomeReport, request_id)
            if earlier is not None:
                if earlier.fingerprint != fingerprint:
                    raise request_conflict("was already used for a different request")
                customer_id = session.scalar(
                    select(_T.customer_id).where(_T.transaction_id == earlier.transaction_id)
                )
                return (
                    OutcomeRecord(
                        transaction_id=earlier.transaction_id,
                        customer_id=customer_id or "",
                        outcome=Outcome(earlier.outcome),
                        outcome_at=earlier.outcome_at,
                        note=earlier.note,
                    ),
                    True,
                )
            outcome_at = utc(reported_at)
            customer_id = session.scalar(
                update(_T)
                .where(_T.transaction_id == transaction_id)
                .values(
                    outcome=outcome.value,
                    outcome_at=outcome_at,
                    outcome_note=note,
                    outcome_request_id=request_id,
                )
                .returning(_T.customer_id)
            )
            if customer_id is None:
                raise NotFound("no transaction has this id", reason="TRANSACTION_NOT_FOUND")
            session.add(
                SqlRiskOutcomeReport(
                    request_id=request_id,
                    fingerprint=fingerprint,
                    transaction_id=transaction_id,
                    outcome=outcome.value,
                    outcome_at=outcome_at,
                    note=note,
                    received_at=utc(now),
                )
            )
            session.flush()
            return OutcomeRecord(transaction_id, customer_id, outcome, outcome_at, note), False

    def bulk_outcomes(self, items: Sequence[tuple[str, Outcome, datetime]]) -> int:
        """Label stored transactions ``(transaction_id, outcome, outcome_at)`` in one transaction.

        Unknown ids are skipped; returns how many distinct transactions were labelled. Later items win.
        """
        latest = {transaction_id: (outcome, at) for transaction_id, outcome, at in items}
        if not latest:
            return 0
        statement = (
            update(TRANSACTIONS)
            .where(TRANSACTIONS.c.transaction_id == bindparam("tid"))
            .values(outcome=bindparam("label"), outcome_at=bindparam("at"))
        )
        matched = 0
        with self._db.session() as session:
            connection = session.connection()
            for chunk in chunks(list(latest.items()), CHUNK):
                params = [{"tid": tid, "label": label.value, "at": utc(at)} for tid, (label, at) in chunk]
                # Both drivers sum the row counts of an executemany (the dialects declare it); unknown ids
                # count 0. Reading the ids first would risk the scan described in import_transactions.
                matched += summed_rowcount(connection.execute(statement, params).rowcount)
        return matched

    def labelled(
        self, *, since: datetime | None = None, until: datetime | None = None
    ) -> list[LabelledTransaction]:
        """Transactions labelled FRAUD or CHARGEBACK with ``since <= outcome_at < until``, oldest first."""
        query = (
            select(
                _T.transaction_id,
                _T.customer_id,
                _T.merchant_id,
                _T.terminal_id,
                _T.event_time,
                _T.outcome,
                _T.outcome_at,
            )
            .where(_T.outcome.in_(FRAUD_LABELS))
            .order_by(_T.outcome_at, _T.id)
        )
        if since is not None:
            query = query.where(_T.outcome_at >= since)
        if until is not None:
            query = query.where(_T.outcome_at < until)
        with self._db.session(read_only=True) as session:
            return [
                LabelledTransaction(
                    transaction_id=row.transaction_id,
                    customer_id=row.customer_id,
                    merchant_id=row.merchant_id,
                    terminal_id=row.terminal_id,
                    event_time=row.event_time,
                    outcome=Outcome(row.outcome),
                    outcome_at=row.outcome_at,
                )
                for row in session.execute(query)
            ]

    # -- model registry -------------------------------------------------------------------------------

    def add_models(self, models: Sequence[NewModel]) -> None:
        """Register trained models as CANDIDATEs in one transaction; a version taken already is refused."""
        if not models:
            return
        values: list[dict[str, Any]] = []
        keys: set[tuple[str, str | None, str]] = set()
        for model in models:
            customer = _registry_customer(model.scope, model.customer_id)
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
            slot = (scope.value, _registry_customer(scope, customer_id))
            if slot in wanted:
                raise InvalidArgument.field("models", "name the same scope and customer more than once")
            wanted[slot] = version
        if not wanted:
            return []
        results: list[Activation] = []
        with self._db.session() as session:
            _lock_registry(session, now)
            for chunk in chunks(list(wanted.items()), CHUNK):
                results.extend(_activate_chunk(session, chunk, utc(now)))
            if any(result.changed for result in results):
                _bump_generation(session, now)
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
        customer = _registry_customer(scope, customer_id)
        if request_id is not None and actor is None:
            raise ValueError("an idempotent promotion needs an actor: its answer is kept in the audit log")
        with self._db.session() as session:
            _lock_registry(session, now)
            if request_id is not None:
                details = _earlier_registry_call(session, _PROMOTED, request_id, fingerprint)
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
                query = query.where(*_slot(scope.value, customer))
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
            metrics = _model(head, with_artifact=False).metrics
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
            _bump_generation(session, now)
            # A run without a GLOBAL model has no one model to answer with: the active global model stays.
            named = head.scope == scope.value
            result = Promotion(
                version=version,
                model=_model(head, with_artifact=False) if named else None,
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
        customer = _registry_customer(scope, customer_id)
        if version and customer is not None:
            raise InvalidArgument.field("version", "is only for the GLOBAL scope: a run is rolled back whole")
        if request_id is not None and actor is None:
            raise ValueError("an idempotent rollback needs an actor: its answer is kept in the audit log")
        with self._db.session() as session:
            _lock_registry(session, now)
            if request_id is not None:
                details = _earlier_registry_call(session, _ROLLED_BACK, request_id, fingerprint)
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
                        *_slot(scope.value, customer), _M.status == ModelStatus.ACTIVE.value
                    )
                ).first()
                if current is None:
                    raise FailedPrecondition(
                        "there is no active model to roll back", reason="NO_ACTIVE_MODEL"
                    )
                version = current.version
            query = select(*active).where(_M.version == version, _M.status == ModelStatus.ACTIVE.value)
            if customer is not None:
                query = query.where(*_slot(scope.value, customer))
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
            _bump_generation(session, now)
            model = None
            if head is not None:
                row = session.scalar(
                    select(_M)
                    .options(defer(_M.artifact))
                    .where(_M.id == head.previous_id)
                    .execution_options(populate_existing=True)
                )
                assert row is not None  # a foreign key
                model = _model(row, with_artifact=False)
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
            page = [_model(row, with_artifact=False) for row in rows[:limit]]
        return page, (page[-1].id if more and page else None)

    def get_model(self, scope: ModelScope, customer_id: str, version: str) -> ModelRecord | None:
        """One version with its artifact, or None."""
        customer = _registry_customer(scope, customer_id)
        with self._db.session(read_only=True) as session:
            row = session.scalar(select(_M).where(*_slot(scope.value, customer), _M.version == version))
            return _model(row, with_artifact=True) if row is not None else None

    def active_model(self, scope: ModelScope, customer_id: str) -> ModelRecord | None:
        """The active model of a scope (and customer) with its artifact, or None."""
        customer = _registry_customer(scope, customer_id)
        with self._db.session(read_only=True) as session:
            row = session.scalar(
                select(_M).where(*_slot(scope.value, customer), _M.status == ModelStatus.ACTIVE.value)
            )
            return _model(row, with_artifact=True) if row is not None else None

    def active_models(self, scope: ModelScope | None = None) -> list[ModelRecord]:
        """Every active model (of one scope, when given) with its artifact: what a server loads."""
        query = select(_M).where(_M.status == ModelStatus.ACTIVE.value).order_by(_M.id)
        if scope is not None:
            query = query.where(_M.scope == scope.value)
        with self._db.session(read_only=True) as session:
            return [_model(row, with_artifact=True) for row in session.scalars(query)]

    def generation(self) -> int:
        """The registry's change counter: it moves whenever an active model changes (0 before the first)."""
        with self._db.session(read_only=True) as session:
            value = session.scalar(
                select(SqlRiskModelGeneration.generation).where(SqlRiskModelGeneration.id == _GENERATION_ID)
            )
            return int(value) if value is not None else 0

    # -- shadow scoring -------------------------------------------------------------------------------
    # One training run at a time (its one version: the GLOBAL model, if the run trained one, and its CUSTOMER
    # models) can run in SHADOW: servers score every transaction with it too, answer with the active models,
    # and store its score next to the transaction for comparison.

    def set_shadow(self, version: str, *, now: datetime, actor: str | None, reason: str = "") -> int:
        """Run a training run's CANDIDATE models in shadow; returns how many models became SHADOW.

        A run that was in shadow before goes back to CANDIDATE (one shadow run at a time). Models of the
        version that are not CANDIDATEs (ACTIVE, RETIRED) stay as they are. NotFound when no model has this
        version, FailedPrecondition when none of them is a CANDIDATE. Bumps the generation, so servers
        reload; with an ``actor``, a ``model.shadowed`` audit event is appended in the same transaction.
        """
        with self._db.session() as session:
            _lock_registry(session, now)
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
            _bump_generation(session, now)
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
            _lock_registry(session, now)
            versions = _shadow_versions(session)
            if not versions:
                return 0
            cleared = _changed_rows(
                session,
                update(MODELS)
                .where(MODELS.c.status == ModelStatus.SHADOW.value)
                .values(status=ModelStatus.CANDIDATE.value),
            )
            _bump_generation(session, now)
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

    def shadow_model(self, scope: ModelScope, customer_id: str) -> ModelRecord | None:
        """The SHADOW model of a scope (and customer) with its artifact, or None."""
        customer = _registry_customer(scope, customer_id)
        with self._db.session(read_only=True) as session:
            row = session.scalar(
                select(_M).where(*_slot(scope.value, customer), _M.status == ModelStatus.SHADOW.value)
            )
            return _model(row, with_artifact=True) if row is not None else None

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


def _history_batch(rows: list[Any]) -> HistoryBatch:
    columns = list(zip(*rows, strict=True))
    channels = {c.value: c for c in Channel}
    outcomes: dict[str | None, Outcome | None] = {o.value: o for o in Outcome}
    outcomes[None] = None
    return HistoryBatch(
        transaction_ids=columns[1],
        customer_ids=columns[2],
        event_times=columns[3],
        amounts_minor=columns[4],
        currencies=columns[5],
        merchant_ids=columns[6],
        terminal_ids=columns[7],
        mccs=columns[8],
        channels=tuple(channels[c] for c in columns[9]),
        latitudes=columns[10],
        longitudes=columns[11],
        outcomes=tuple(outcomes[o] for o in columns[12]),
        outcome_ats=columns[13],
    )


# -- registry helpers ---------------------------------------------------------------------------------


def _registry_customer(scope: ModelScope, customer_id: str) -> str | None:
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


def _slot(scope: str, customer: str | None) -> list[ColumnElement[bool]]:
    return [_M.scope == scope, _M.customer_id.is_(None) if customer is None else _M.customer_id == customer]


def _version_taken(version: str) -> AlreadyExists:
    return AlreadyExists(
        "this model version is already registered",
        reason="MODEL_VERSION_EXISTS",
        metadata={"version": version},
    )


def _metrics_json(metrics: Mapping[str, float]) -> str:
    return json.dumps({name: float(value) for name, value in metrics.items()}, sort_keys=True)


def _model(row: SqlRiskModel, *, with_artifact: bool) -> ModelRecord:
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
    )


def _lock_registry(session: Session, now: datetime) -> None:
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


def _bump_generation(session: Session, now: datetime) -> None:
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
            results.append(Activation(_model(target, with_artifact=False), "", changed=False))
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
            _model(target, with_artifact=False), current.version if current is not None else "", changed=True
        )
        for target, current in plan
    )
    return results


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
        conditions = _slot(head.scope, head.customer_id)
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
        select(_M).options(defer(_M.artifact)).where(*_slot(scope, customer), _M.version == version)
    )
    return _model(row, with_artifact=False) if row is not None else None


def _earlier_registry_call(
    session: Session, method: str, request_id: str, fingerprint: str
) -> dict[str, str] | None:
    """The audit details of an earlier call with this ``request_id`` (its answer), or None.

    The answer is kept where the call already wrote it, in its audit event (with the request_id among the
    details); the idempotency key finds the event by its time. Another request under the same request_id is
    an InvalidArgument.
    """
    done = session.get(SqlIdempotencyKey, (method, request_id))
    if done is None:
        return None
    if done.fingerprint != fingerprint:
        raise InvalidArgument.field(
            "request_id", "was already used for a different request", reason="IDEMPOTENCY_CONFLICT"
        )
    events = session.scalars(
        select(SqlAuditEvent.details)
        .where(SqlAuditEvent.action == method, SqlAuditEvent.occurred_at == done.created_at)
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
        session.add(
            SqlIdempotencyKey(
                method=method,
                request_id=request_id,
                fingerprint=fingerprint,
                customer_id=customer or "",
                created_at=utc(now),
            )
        )
    append_event(session, actor=actor, action=method, subject=version, details=details, now=now)
