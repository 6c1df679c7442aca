"""Storage of transaction risk: scored and imported transactions, customer profiles, outcome labels and the
model registry.

Scoring is one database transaction per call: the customer row is locked first (``FOR NO KEY UPDATE`` on
PostgreSQL, SQLite's ``BEGIN IMMEDIATE`` serialises writers anyway), so concurrent scores of one customer
see each other's profile updates, and a retry of a transaction id finds the first answer. The unique index
on ``transaction_id`` backs this up across customers and replicas.

The model registry keeps at most one ACTIVE model per scope and customer (checked here, and by partial
unique indexes on both backends); every change of an active model bumps a one-row generation counter in the
same transaction, so serving processes notice with one cheap read and reload without a restart. A training
run's models share one version; ``promote`` and ``rollback`` of the GLOBAL scope move the whole run at once,
serialised across processes on the generation row.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    case,
    distinct,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, defer, mapped_column

from posguard_server.domain.customers import CustomerNumber, ExternalRef
from posguard_server.domain.dynamic_codes import PresentedCode
from posguard_server.domain.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PosguardError,
)
from posguard_server.domain.risk import (
    METRIC_AP,
    METRIC_BASELINE_AP,
    Activation,
    Answer,
    Channel,
    Decision,
    Evaluation,
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
    StoredReason,
    StoredTransaction,
    TransactionSource,
    promotion_refusal,
)
from posguard_server.store.audit import SqlAuditEvent, append_event
from posguard_server.store.customers import (
    CUSTOMER_ID_MAX,
    SqlCustomer,
    SqlIdempotencyKey,
    externals_in,
    numbers_in,
    primaries_in,
)
from posguard_server.store.dynamic_codes import (
    Attempt,
    OpenKey,
    RedemptionAnswer,
    enrolment_owners,
    redeem_in,
)
from posguard_server.store.schema import REQUEST_ID_MAX, Base

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement
    from sqlalchemy.orm import Session

    from posguard_server.store.db import Database

# Widths callers validate against. The contract allows transaction ids and notes this long.
TRANSACTION_ID_MAX = 128
MERCHANT_ID_MAX = 64
TERMINAL_ID_MAX = 64
MCC_LENGTH = 4
CURRENCY_LENGTH = 3
FINGERPRINT_MAX = 64
OUTCOME_NOTE_MAX = 1000
MODEL_VERSION_MAX = 64

# How often a write that lost a race on a unique constraint is re-run; the re-run sees the winner.
_ATTEMPTS = 3
# Rows per executemany and values per IN list: well below SQLite's limit on bound parameters.
_CHUNK = 500
_HISTORY_BATCH_ROWS = 50_000
_FRAUD_LABELS = (Outcome.FRAUD.value, Outcome.CHARGEBACK.value)
# The generation counter's only row.
_GENERATION_ID = 1

_Item = TypeVar("_Item")


def _in_list(column: str, values: Iterable[str]) -> str:
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


class SqlRiskTransaction(Base):
    """One transaction, imported as history or scored live; a scored one carries its answer."""

    __tablename__ = "risk_transactions"
    __table_args__ = (
        # Feature history and training read a customer's transactions in event-time order.
        Index("ix_risk_transactions_customer_time", "customer_id", "event_time", "id"),
        Index("ix_risk_transactions_outcome", "outcome", "outcome_at"),
        # Label feedback asks, per score, who paid at a terminal (or a terminal-less merchant) lately.
        Index("ix_risk_transactions_terminal_time", "terminal_id", "event_time"),
        Index(
            "ix_risk_transactions_merchant_time",
            "merchant_id",
            "event_time",
            sqlite_where=text("terminal_id = ''"),
            postgresql_where=text("terminal_id = ''"),
        ),
        # The shadow comparison reads one run's transactions; only transactions scored in shadow are indexed.
        Index(
            "ix_risk_transactions_shadow_version",
            "shadow_version",
            sqlite_where=text("shadow_version IS NOT NULL"),
            postgresql_where=text("shadow_version IS NOT NULL"),
        ),
        CheckConstraint(_in_list("source", (s.value for s in TransactionSource)), name="source"),
        CheckConstraint(_in_list("channel", (c.value for c in Channel)), name="channel"),
        CheckConstraint(_in_list("decision", (d.value for d in Decision)), name="decision"),
        CheckConstraint(_in_list("model_scope", (s.value for s in ModelScope)), name="model_scope"),
        CheckConstraint(_in_list("outcome", (o.value for o in Outcome)), name="outcome"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    transaction_id: Mapped[str] = mapped_column(String(TRANSACTION_ID_MAX), unique=True)
    customer_id: Mapped[str] = mapped_column(String(CUSTOMER_ID_MAX), ForeignKey("customers.customer_id"))
    event_time: Mapped[datetime]
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(CURRENCY_LENGTH))
    merchant_id: Mapped[str] = mapped_column(String(MERCHANT_ID_MAX))
    terminal_id: Mapped[str] = mapped_column(String(TERMINAL_ID_MAX))
    mcc: Mapped[str] = mapped_column(String(MCC_LENGTH))
    channel: Mapped[str] = mapped_column(String(16))
    latitude: Mapped[float | None] = mapped_column(Double)
    longitude: Mapped[float | None] = mapped_column(Double)
    source: Mapped[str] = mapped_column(String(8))
    # False for a transaction kept only for replay and reports (e.g. a rule decline): not training data.
    in_history: Mapped[bool] = mapped_column(Boolean)
    # The scored request's fingerprint: a retry must match it to be answered from the stored answer.
    fingerprint: Mapped[str | None] = mapped_column(String(FINGERPRINT_MAX))
    # Unique so that an idempotency key reused for another transaction is refused; NULLs do not collide.
    request_id: Mapped[str | None] = mapped_column(String(REQUEST_ID_MAX), unique=True)
    scored_at: Mapped[datetime | None]
    risk_score: Mapped[float | None] = mapped_column(Double)
    decision: Mapped[str | None] = mapped_column(String(16))
    # JSON list of {"code", "message", "weight"}.
    reasons: Mapped[str | None] = mapped_column(Text)
    model_scope: Mapped[str | None] = mapped_column(String(16))
    model_version: Mapped[str | None] = mapped_column(String(MODEL_VERSION_MAX))
    history_size: Mapped[int | None] = mapped_column(Integer)
    cold_start: Mapped[bool | None] = mapped_column(Boolean)
    # The feature vector as float64 bytes, for reports and evaluation.
    features: Mapped[bytes | None] = mapped_column(LargeBinary)
    outcome: Mapped[str | None] = mapped_column(String(16))
    outcome_at: Mapped[datetime | None]
    outcome_note: Mapped[str | None] = mapped_column(String(OUTCOME_NOTE_MAX))
    # The report that set the current label (the full log is risk_outcome_reports).
    outcome_request_id: Mapped[str | None] = mapped_column(String(REQUEST_ID_MAX))
    # The shadow run scoring alongside the answer's models, and its score (NULL when none was running): for
    # comparing the two in reports, never part of the answer.
    shadow_version: Mapped[str | None] = mapped_column(String(MODEL_VERSION_MAX))
    shadow_risk_score: Mapped[float | None] = mapped_column(Double)


class SqlRiskOutcomeReport(Base):
    """One ReportOutcome call, kept under its request_id so that a retry replays it.

    A log rather than columns on the transaction: a later report may overwrite the label, and a retry of the
    earlier one must still be recognised as a retry instead of writing its label back.
    """

    __tablename__ = "risk_outcome_reports"
    __table_args__ = (CheckConstraint(_in_list("outcome", (o.value for o in Outcome)), name="outcome"),)

    request_id: Mapped[str] = mapped_column(String(REQUEST_ID_MAX), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(FINGERPRINT_MAX))
    transaction_id: Mapped[str] = mapped_column(
        String(TRANSACTION_ID_MAX), ForeignKey("risk_transactions.transaction_id"), index=True
    )
    outcome: Mapped[str] = mapped_column(String(16))
    outcome_at: Mapped[datetime]
    note: Mapped[str] = mapped_column(String(OUTCOME_NOTE_MAX))
    received_at: Mapped[datetime]


class SqlRiskProfile(Base):
    """A customer's feature profile. ``state`` is opaque here: the features module encodes and reads it."""

    __tablename__ = "risk_profiles"

    customer_id: Mapped[str] = mapped_column(
        String(CUSTOMER_ID_MAX), ForeignKey("customers.customer_id"), primary_key=True
    )
    state: Mapped[bytes] = mapped_column(LargeBinary)
    transaction_count: Mapped[int] = mapped_column(Integer)
    first_seen: Mapped[datetime | None]
    last_seen: Mapped[datetime | None]
    declines: Mapped[int] = mapped_column(Integer, default=0)
    reviews: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime]


class SqlRiskModel(Base):
    """A model version in the registry.

    GLOBAL models have a NULL customer_id, so CUSTOMER models keep their foreign key. NULLs never collide in
    a unique index, so the GLOBAL rows get partial unique indexes of their own (``WHERE customer_id IS
    NULL``); SQLite and PostgreSQL both support them. The same goes for "at most one ACTIVE".
    """

    __tablename__ = "risk_models"
    __table_args__ = (
        UniqueConstraint("scope", "customer_id", "version", name="uq_risk_models_scope_customer_version"),
        Index(
            "uq_risk_models_global_version",
            "version",
            unique=True,
            sqlite_where=text("customer_id IS NULL"),
            postgresql_where=text("customer_id IS NULL"),
        ),
        Index(
            "uq_risk_models_active_customer",
            "customer_id",
            unique=True,
            sqlite_where=text("status = 'ACTIVE'"),
            postgresql_where=text("status = 'ACTIVE'"),
        ),
        Index(
            "uq_risk_models_active_global",
            "scope",
            unique=True,
            sqlite_where=text("status = 'ACTIVE' AND customer_id IS NULL"),
            postgresql_where=text("status = 'ACTIVE' AND customer_id IS NULL"),
        ),
        # A training run is promoted, rolled back, put in shadow and reported on by its version.
        Index("ix_risk_models_version", "version"),
        # Servers look for the shadow run on every reload; only the shadow run's rows are in this index.
        Index(
            "ix_risk_models_shadow_version",
            "version",
            sqlite_where=text("status = 'SHADOW'"),
            postgresql_where=text("status = 'SHADOW'"),
        ),
        CheckConstraint("scope IN ('CUSTOMER', 'GLOBAL')", name="scope"),
        CheckConstraint(_in_list("status", (s.value for s in ModelStatus)), name="status"),
        CheckConstraint(
            "(scope = 'GLOBAL' AND customer_id IS NULL) OR (scope = 'CUSTOMER' AND customer_id IS NOT NULL)",
            name="scope_customer",
        ),
    )

    # Ordered by registration: listing is newest first by id.
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    scope: Mapped[str] = mapped_column(String(16))
    customer_id: Mapped[str | None] = mapped_column(
        String(CUSTOMER_ID_MAX), ForeignKey("customers.customer_id")
    )
    version: Mapped[str] = mapped_column(String(MODEL_VERSION_MAX))
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    training_window_start: Mapped[datetime]
    training_window_end: Mapped[datetime]
    sample_count: Mapped[int] = mapped_column(Integer)
    # JSON object of metric name → value.
    metrics: Mapped[str] = mapped_column(Text)
    activated_at: Mapped[datetime | None]
    # The model that was active when this one was activated: where a rollback returns to.
    previous_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("risk_models.id"))
    artifact: Mapped[bytes] = mapped_column(LargeBinary)


class SqlRiskModelGeneration(Base):
    """One row counting changes of active models; servers compare it to decide whether to reload."""

    __tablename__ = "risk_model_generation"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    generation: Mapped[int] = mapped_column(Integer)
    changed_at: Mapped[datetime]


_TRANSACTIONS = cast(Table, SqlRiskTransaction.__table__)
_PROFILES = cast(Table, SqlRiskProfile.__table__)
_MODELS = cast(Table, SqlRiskModel.__table__)
_GENERATION = cast(Table, SqlRiskModelGeneration.__table__)

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

# (customers with fraud reported, customers) at the transaction's place in the feedback window; see
# ``SqlRiskStore.place_activity``. None when no place was asked for.
PlaceActivity = tuple[int, int]


class Evaluate(Protocol):
    """The profile the scorer saw (None for a customer without one), the place's activity → what it decided.

    ``shadow_place`` is passed only for an item with ``shadow_place_since``: the place's activity over the
    shadow run's label-feedback window.
    """

    def __call__(
        self,
        snapshot: ProfileSnapshot | None,
        place: PlaceActivity | None,
        /,
        *,
        shadow_place: PlaceActivity | None = None,
    ) -> Evaluation: ...


# A stored transaction and whether it was an earlier answer replayed.
Scored = tuple[StoredTransaction, bool]
# (scope, customer_id ("" for GLOBAL), version)
ModelKey = tuple[ModelScope, str, str]


@dataclass(frozen=True, slots=True)
class ScoreItem:
    """One transaction to score: ``evaluate`` runs inside the transaction, with the customer locked."""

    record: NewTransaction
    fingerprint: str
    request_id: str  # "" for none
    evaluate: Evaluate
    # Read the place's activity over [place_since, the transaction's time), inside the transaction, so it
    # counts the transactions stored before this one in the same batch. None: not needed.
    place_since: datetime | None = None
    # The same over the shadow run's window, when it differs from ``place_since``'s (each training run picks
    # its own); handed to ``evaluate`` as ``shadow_place``. None: not needed.
    shadow_place_since: datetime | None = None


def _transaction_conflict(message: str) -> InvalidArgument:
    return InvalidArgument.field("transaction.transaction_id", message, reason="IDEMPOTENCY_CONFLICT")


def _request_conflict(message: str) -> InvalidArgument:
    return InvalidArgument.field("request_id", message, reason="IDEMPOTENCY_CONFLICT")


class SqlRiskStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    # -- scoring --------------------------------------------------------------------------------------

    def score(
        self,
        record: NewTransaction,
        *,
        fingerprint: str,
        request_id: str,
        evaluate: Evaluate,
        now: datetime,
        place_since: datetime | None = None,
    ) -> Scored:
        """Score and store one transaction and update the customer's profile, all in one transaction.

        Returns ``(stored, replayed)``. A retry of ``record.transaction_id`` with the same ``fingerprint``
        returns the stored answer and changes nothing, also when it raced the original on another replica.
        ``evaluate`` runs inside the transaction with the customer locked: it must be quick, must not touch
        the database, and may be called again if the write lost a race. ``request_id`` "" means none.
        """
        (result,) = self.score_many(
            [ScoreItem(record, fingerprint, request_id, evaluate, place_since)], now=now
        )
        if isinstance(result, PosguardError):
            raise result
        return result

    def score_many(self, items: Sequence[ScoreItem], *, now: datetime) -> list[Scored | PosguardError]:
        """``score`` for several transactions, in order, committed together: one commit, one sync to disk.

        An item that is refused (unknown customer, idempotency conflict) is returned as its error and
        changes nothing; the others are stored. Each item sees what the items before it stored. Errors of
        the whole transaction (the database is unavailable, a bug in ``evaluate``) raise, and then nothing of
        the batch was stored.
        """
        for attempt in range(_ATTEMPTS):
            try:
                with self.scoring_unit() as unit:
                    unit.load_earlier(
                        [item.record.transaction_id for item in items], [item.request_id for item in items]
                    )
                    unit.lock_customers({item.record.customer_id for item in items})
                    return unit.score(items, now=now)
            except AlreadyExists:
                # A concurrent call (another replica) stored one of these transaction ids or request ids
                # first; the re-run finds its row and replays it, or reports the conflict.
                if attempt == _ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    @contextmanager
    def scoring_unit(self) -> Iterator[ScoringUnit]:
        """One database transaction to resolve, lock, redeem, score and store a batch in; see ScoringUnit."""
        with self._db.session() as session:
            yield ScoringUnit(session)

    def get_transaction(self, transaction_id: str) -> StoredTransaction | None:
        with self._db.session(read_only=True) as session:
            row = session.scalar(select(_T).where(_T.transaction_id == transaction_id))
            return _stored(row) if row is not None else None

    def request_id_used(self, request_id: str) -> bool:
        """Whether a stored transaction was scored under this idempotency key."""
        with self._db.session(read_only=True) as session:
            return session.scalar(select(_T.id).where(_T.request_id == request_id).limit(1)) is not None

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
            _require_customers(session, {row.customer_id for row in unique.values()})
            # ON CONFLICT rather than a read of the ids first: a statement PostgreSQL prepared while the
            # table was small keeps its plan, a scan, for the rest of a long import.
            statement = (
                _dialect_insert(session)(_TRANSACTIONS)
                .on_conflict_do_nothing(index_elements=["transaction_id"])
                .execution_options(preserve_rowcount=True)
            )
            connection = session.connection()
            for chunk in _chunks(list(unique.values()), _CHUNK):
                values = [
                    _transaction_values(row, TransactionSource.IMPORT, in_history=True) for row in chunk
                ]
                # A plain executemany (no RETURNING) is the fastest path on both drivers, and both sum its
                # row counts: skipped rows count 0.
                added += _summed_rowcount(connection.execute(statement, values).rowcount)
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
            labelled: ColumnElement[bool] = _T.outcome.in_(_FRAUD_LABELS)
            if labels_known_at is not None:
                labelled = and_(labelled, _T.outcome_at <= labels_known_at)
            conditions.append(or_(_T.outcome.is_(None), ~labelled))
        if customer_ids is None:
            groups: Iterable[list[ColumnElement[bool]]] = [conditions]
        else:
            wanted = sorted(set(customer_ids))
            groups = ([*conditions, _T.customer_id.in_(chunk)] for chunk in _chunks(wanted, _CHUNK))
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
            return _snapshot(row) if row is not None else None

    def put_profiles(self, profiles: Sequence[tuple[str, ProfileSnapshot]], *, now: datetime) -> None:
        """Insert or replace customers' profiles in one transaction (rebuilding them after an import)."""
        latest = dict(profiles)
        if not latest:
            return
        with self._db.session() as session:
            _require_customers(session, set(latest))
            dialect_insert = _dialect_insert(session)
            statement = dialect_insert(_PROFILES)
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
            for chunk in _chunks(items, _CHUNK):
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

    def place_activity(
        self, *, terminal_id: str, merchant_id: str, since: datetime, until: datetime
    ) -> tuple[int, int]:
        """``(customers with fraud reported by until, customers)`` who paid at a place in ``[since, until)``.

        The place is the terminal, or the merchant when there is no terminal id: the key training's label
        feedback uses. Fraud means FRAUD or CHARGEBACK reported at or before ``until``. Counts transactions
        that are in history, like the training data.
        """
        with self._db.session(read_only=True) as session:
            return _place_activity(session, terminal_id, merchant_id, since, until)

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
        for attempt in range(_ATTEMPTS):
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
                if attempt == _ATTEMPTS - 1:
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
                    raise _request_conflict("was already used for a different request")
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
            outcome_at = _utc(reported_at)
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
                    received_at=_utc(now),
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
            update(_TRANSACTIONS)
            .where(_TRANSACTIONS.c.transaction_id == bindparam("tid"))
            .values(outcome=bindparam("label"), outcome_at=bindparam("at"))
        )
        matched = 0
        with self._db.session() as session:
            connection = session.connection()
            for chunk in _chunks(list(latest.items()), _CHUNK):
                params = [{"tid": tid, "label": label.value, "at": _utc(at)} for tid, (label, at) in chunk]
                # Both drivers sum the row counts of an executemany (the dialects declare it); unknown ids
                # count 0. Reading the ids first would risk the scan described in import_transactions.
                matched += _summed_rowcount(connection.execute(statement, params).rowcount)
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
            .where(_T.outcome.in_(_FRAUD_LABELS))
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
            _require_customers(session, {v["customer_id"] for v in values if v["customer_id"] is not None})
            # Check everything before inserting anything: a training run's models share one version, so a
            # check after the first chunk's insert would find that chunk.
            for chunk in _chunks(sorted({v["version"] for v in values}), _CHUNK):
                taken = session.execute(
                    select(_M.scope, _M.customer_id, _M.version).where(_M.version.in_(chunk))
                )
                for scope, customer, version in taken:
                    if (scope, customer, version) in keys:
                        raise _version_taken(version)
            for rows in _chunks(values, _CHUNK):
                session.execute(insert(_MODELS), rows)

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
            for chunk in _chunks(list(wanted.items()), _CHUNK):
                results.extend(_activate_chunk(session, chunk, _utc(now)))
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
            for chunk in _chunks(keys, _CHUNK):
                _activate_chunk(session, chunk, _utc(now))
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
            for chunk in _chunks([row.id for row in rolled], _CHUNK):
                session.execute(
                    update(_MODELS).where(_MODELS.c.id.in_(chunk)).values(status=ModelStatus.RETIRED.value)
                )
            # Retire everything first: the partial unique indexes allow one ACTIVE per slot at any moment.
            previous = [row.previous_id for row in rolled if row.previous_id is not None]
            for chunk in _chunks(previous, _CHUNK):
                session.execute(
                    update(_MODELS)
                    .where(_MODELS.c.id.in_(chunk))
                    .values(status=ModelStatus.ACTIVE.value, activated_at=_utc(now))
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
                update(_MODELS)
                .where(_MODELS.c.status == ModelStatus.SHADOW.value, _MODELS.c.version != version)
                .values(status=ModelStatus.CANDIDATE.value)
            )
            shadowed = _changed_rows(
                session,
                update(_MODELS)
                .where(_MODELS.c.version == version, _MODELS.c.status == ModelStatus.CANDIDATE.value)
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
                update(_MODELS)
                .where(_MODELS.c.status == ModelStatus.SHADOW.value)
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
                fraud.append(outcome in _FRAUD_LABELS)
        return ShadowPairs(tuple(ids), tuple(active), tuple(shadow), tuple(fraud))


# -- helpers ------------------------------------------------------------------------------------------


class ScoringUnit:
    """A batch of scores in one open database transaction: what decides each score is read in it.

    The caller loads the stored transactions the batch names, reads whom it names, locks those customers
    (``lock_customers``, once, in one order), reads again what may have changed before the lock (a number's
    status, an external id's link), redeems dynamic codes and stores the answers with ``score``. Nothing is
    kept unless the whole block commits.
    """

    def __init__(self, session: Session) -> None:
        self._session = session
        self._earlier = _Earlier({}, set())
        self._locked: set[str] = set()

    def load_earlier(self, transaction_ids: Iterable[str], request_ids: Iterable[str]) -> None:
        self._earlier = _Earlier.load(self._session, transaction_ids, request_ids)

    def replay_of(self, transaction_id: str, fingerprint: str, request_id: str) -> StoredTransaction | None:
        """The stored transaction a retry replays; None for a new one; InvalidArgument on a conflict."""
        row = self._earlier.check(transaction_id, fingerprint, request_id)
        return _stored(row) if row is not None else None

    def lock_customers(self, customer_ids: set[str]) -> set[str]:
        """Lock the customers until commit; those that exist. Called once per unit, so the order holds."""
        self._locked = _lock_customers(self._session, customer_ids)
        return self._locked

    def numbers(self, numbers: Collection[str]) -> dict[str, tuple[CustomerNumber, str]]:
        return numbers_in(self._session, numbers)

    def primaries(self, customer_ids: Collection[str]) -> dict[str, CustomerNumber]:
        return primaries_in(self._session, customer_ids)

    def externals(self, refs: Collection[ExternalRef]) -> dict[ExternalRef, str]:
        return externals_in(self._session, refs)

    def enrolment_owners(self, handles: Collection[str]) -> dict[str, str]:
        return enrolment_owners(self._session, handles)

    def redeem(
        self, code: PresentedCode, attempt: Attempt, *, open_key: OpenKey, now: datetime, now_step: int
    ) -> RedemptionAnswer:
        return redeem_in(self._session, code, attempt, open_key=open_key, now=now, now_step=now_step)

    def score(self, items: Sequence[ScoreItem], *, now: datetime) -> list[Scored | PosguardError]:
        """Store each item with its answer, in order, among the customers locked; one result per item."""
        session, earlier, known = self._session, self._earlier, self._locked
        results: list[Scored | PosguardError] = []
        # Places of rows added since the last flush; the rest is written in one go at commit.
        places_written: set[tuple[str, str]] = set()
        profiles = _profiles(session, {item.record.customer_id for item in items} & known)
        for item in items:
            record = item.record
            if record.customer_id not in known:
                results.append(NotFound("no such customer", reason="CUSTOMER_NOT_FOUND"))
                continue
            try:
                replay = earlier.check(record.transaction_id, item.fingerprint, item.request_id)
            except InvalidArgument as conflict:
                results.append(conflict)
                continue
            if replay is not None:
                results.append((_stored(replay), True))
                continue
            profile = profiles.get(record.customer_id)
            place = shadow_place = None
            if item.place_since is not None or item.shadow_place_since is not None:
                key = _place_key(record)
                if key in places_written:
                    # An earlier item of this batch paid here: it must count, so write it out first.
                    session.flush()
                    places_written.clear()
                with session.no_autoflush:
                    if item.place_since is not None:
                        place = _place_activity(
                            session,
                            record.terminal_id,
                            record.merchant_id,
                            item.place_since,
                            _utc(record.event_time),
                        )
                    if item.shadow_place_since is not None:
                        shadow_place = _place_activity(
                            session,
                            record.terminal_id,
                            record.merchant_id,
                            item.shadow_place_since,
                            _utc(record.event_time),
                        )
            snapshot = _snapshot(profile) if profile is not None else None
            if item.shadow_place_since is None:
                evaluation = item.evaluate(snapshot, place)
            else:
                evaluation = item.evaluate(snapshot, place, shadow_place=shadow_place)
            # Both or neither: a version without a score would count as compared.
            has_shadow = bool(evaluation.shadow_version) and evaluation.shadow_risk_score is not None
            row = SqlRiskTransaction(
                **_transaction_values(record, TransactionSource.SCORE, evaluation.counts_in_history),
                fingerprint=item.fingerprint,
                request_id=item.request_id or None,
                scored_at=_utc(now),
                risk_score=evaluation.risk_score,
                decision=evaluation.decision.value,
                reasons=_reasons_json(evaluation.reasons),
                model_scope=evaluation.model_scope.value,
                model_version=evaluation.model_version,
                history_size=evaluation.history_size,
                cold_start=evaluation.cold_start,
                features=evaluation.features,
                shadow_version=evaluation.shadow_version if has_shadow else None,
                shadow_risk_score=evaluation.shadow_risk_score if has_shadow else None,
            )
            session.add(row)
            earlier.add(row)
            places_written.add(_place_key(record))
            if evaluation.new_state is not None:
                profiles[record.customer_id] = _advance_profile(
                    session, profile, record, evaluation, evaluation.new_state, now
                )
            results.append((_stored(row), False))
        return results


def _utc(value: datetime) -> datetime:
    """The same instant in UTC, as the database gives it back, so a first answer equals its replay."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("timestamps must be timezone-aware")
    return value.astimezone(UTC)


def _chunks(items: Sequence[_Item], size: int) -> Iterator[Sequence[_Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _summed_rowcount(count: int) -> int:
    if count < 0:
        # Guards a driver change: psycopg 3 and sqlite3 both sum the counts of an executemany.
        raise RuntimeError("the database driver did not report how many rows it changed")
    return count


def _dialect_insert(session: Session) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def _place_key(record: NewTransaction) -> tuple[str, str]:
    """Where label feedback counts a transaction: its terminal, or its merchant when it has none."""
    return (record.terminal_id, "") if record.terminal_id else ("", record.merchant_id)


def _place_activity(
    session: Session, terminal_id: str, merchant_id: str, since: datetime, until: datetime
) -> PlaceActivity:
    place = (
        _T.terminal_id == terminal_id
        if terminal_id
        else and_(_T.terminal_id == "", _T.merchant_id == merchant_id)
    )
    fraud = and_(_T.outcome.in_(_FRAUD_LABELS), _T.outcome_at <= until)
    frauds, customers = session.execute(
        select(
            func.count(distinct(case((fraud, _T.customer_id)))),
            func.count(distinct(_T.customer_id)),
        ).where(place, _T.event_time >= since, _T.event_time < until, _T.in_history.is_(True))
    ).one()
    return int(frauds), int(customers)


def _lock_customers(session: Session, customer_ids: set[str]) -> set[str]:
    """Lock the customers' rows until commit, so one customer's scores run one after the other; ids found.

    Rows are locked in id order, so batches that share customers wait for each other instead of deadlocking.
    ``FOR NO KEY UPDATE`` (not ``FOR UPDATE``) still lets other transactions insert rows that reference the
    customer (numbers, enrolments) meanwhile. SQLite ignores it: ``BEGIN IMMEDIATE`` serialises writers.
    """
    found: set[str] = set()
    for chunk in _chunks(sorted(customer_ids), _CHUNK):
        found.update(
            session.scalars(
                select(SqlCustomer.customer_id)
                .where(SqlCustomer.customer_id.in_(chunk))
                .order_by(SqlCustomer.customer_id)
                .with_for_update(key_share=True)
            )
        )
    return found


def _require_customers(session: Session, customer_ids: set[str]) -> None:
    """NotFound naming a missing customer, instead of a foreign key violation that reads as a conflict."""
    wanted = sorted(customer_ids)
    for chunk in _chunks(wanted, _CHUNK):
        known = set(
            session.scalars(select(SqlCustomer.customer_id).where(SqlCustomer.customer_id.in_(chunk)))
        )
        missing = [customer_id for customer_id in chunk if customer_id not in known]
        if missing:
            raise NotFound(
                "no such customer", reason="CUSTOMER_NOT_FOUND", metadata={"customer_id": missing[0]}
            )


class _Earlier:
    """The stored transactions a batch's ids and request ids already name, kept up to date as it stores."""

    def __init__(self, rows: dict[str, SqlRiskTransaction], request_ids: set[str]) -> None:
        self._rows = rows
        self._request_ids = request_ids

    @classmethod
    def load(cls, session: Session, transaction_ids: Iterable[str], request_ids: Iterable[str]) -> _Earlier:
        ids = sorted(set(transaction_ids))
        wanted = sorted({request_id for request_id in request_ids if request_id})
        rows: dict[str, SqlRiskTransaction] = {}
        used: set[str] = set()
        for chunk in _chunks(ids, _CHUNK):
            rows.update(
                (row.transaction_id, row)
                for row in session.scalars(select(_T).where(_T.transaction_id.in_(chunk)))
            )
        for chunk in _chunks(wanted, _CHUNK):
            used.update(session.scalars(select(_T.request_id).where(_T.request_id.in_(chunk))))
        return cls(rows, used)

    def check(self, transaction_id: str, fingerprint: str, request_id: str) -> SqlRiskTransaction | None:
        """The stored row a call retries; None for a new transaction; InvalidArgument on a conflict."""
        row = self._rows.get(transaction_id)
        if row is not None:
            if row.source != TransactionSource.SCORE.value:
                # Imported history has no stored answer to replay, and scoring it again would duplicate it.
                raise _transaction_conflict("belongs to imported history")
            if row.fingerprint != fingerprint:
                raise _transaction_conflict("was already used for a different transaction")
            return row
        if request_id and request_id in self._request_ids:
            raise _request_conflict("was already used for a different transaction")
        return None

    def add(self, row: SqlRiskTransaction) -> None:
        self._rows[row.transaction_id] = row
        if row.request_id:
            self._request_ids.add(row.request_id)


def _profiles(session: Session, customer_ids: set[str]) -> dict[str, SqlRiskProfile]:
    found: dict[str, SqlRiskProfile] = {}
    for chunk in _chunks(sorted(customer_ids), _CHUNK):
        found.update(
            (p.customer_id, p)
            for p in session.scalars(select(SqlRiskProfile).where(SqlRiskProfile.customer_id.in_(chunk)))
        )
    return found


def _transaction_values(
    record: NewTransaction, source: TransactionSource, in_history: bool
) -> dict[str, Any]:
    return {
        "transaction_id": record.transaction_id,
        "customer_id": record.customer_id,
        "event_time": _utc(record.event_time),
        "amount_minor": record.amount_minor,
        "currency": record.currency,
        "merchant_id": record.merchant_id,
        "terminal_id": record.terminal_id,
        "mcc": record.mcc,
        "channel": record.channel.value,
        "latitude": record.latitude,
        "longitude": record.longitude,
        "source": source.value,
        "in_history": in_history,
    }


def _advance_profile(
    session: Session,
    profile: SqlRiskProfile | None,
    record: NewTransaction,
    evaluation: Evaluation,
    new_state: bytes,
    now: datetime,
) -> SqlRiskProfile:
    if profile is None:
        profile = SqlRiskProfile(
            customer_id=record.customer_id,
            transaction_count=0,
            first_seen=None,
            last_seen=None,
            declines=0,
            reviews=0,
        )
        session.add(profile)
    profile.state = new_state
    profile.updated_at = _utc(now)
    if evaluation.counts_in_history:
        event_time = _utc(record.event_time)
        profile.transaction_count += 1
        # Transactions can arrive out of event-time order (a gateway's retries, a late batch).
        profile.first_seen = event_time if profile.first_seen is None else min(profile.first_seen, event_time)
        profile.last_seen = event_time if profile.last_seen is None else max(profile.last_seen, event_time)
    if evaluation.decision is Decision.DECLINE:
        profile.declines += 1
    elif evaluation.decision is Decision.REVIEW:
        profile.reviews += 1
    return profile


def _snapshot(row: SqlRiskProfile) -> ProfileSnapshot:
    return ProfileSnapshot(
        state=row.state,
        transaction_count=row.transaction_count,
        first_seen=row.first_seen,
        last_seen=row.last_seen,
        declines=row.declines,
        reviews=row.reviews,
    )


def _reasons_json(reasons: Sequence[StoredReason]) -> str:
    return json.dumps(
        [{"code": r.code, "message": r.message, "weight": r.weight} for r in reasons],
        ensure_ascii=False,
        separators=(",", ":"),
    )


def _reasons(raw: str | None) -> tuple[StoredReason, ...]:
    if not raw:
        return ()
    return tuple(
        StoredReason(item["code"], item["message"], float(item["weight"])) for item in json.loads(raw)
    )


def _stored(row: SqlRiskTransaction) -> StoredTransaction:
    answer: Answer | None = None
    if row.source == TransactionSource.SCORE.value:
        assert row.scored_at is not None
        assert row.risk_score is not None
        assert row.decision is not None
        assert row.model_scope is not None
        answer = Answer(
            risk_score=row.risk_score,
            decision=Decision(row.decision),
            reasons=_reasons(row.reasons),
            model_scope=ModelScope(row.model_scope),
            model_version=row.model_version or "",
            history_size=row.history_size or 0,
            cold_start=bool(row.cold_start),
            scored_at=row.scored_at,
        )
    return StoredTransaction(
        transaction=NewTransaction(
            transaction_id=row.transaction_id,
            customer_id=row.customer_id,
            event_time=row.event_time,
            amount_minor=row.amount_minor,
            currency=row.currency,
            merchant_id=row.merchant_id,
            terminal_id=row.terminal_id,
            mcc=row.mcc,
            channel=Channel(row.channel),
            latitude=row.latitude,
            longitude=row.longitude,
        ),
        source=TransactionSource(row.source),
        answer=answer,
        in_history=row.in_history,
        features=row.features,
        outcome=Outcome(row.outcome) if row.outcome is not None else None,
        outcome_at=row.outcome_at,
    )


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
    dialect_insert = _dialect_insert(session)
    session.execute(
        dialect_insert(_GENERATION)
        .values(id=_GENERATION_ID, generation=0, changed_at=_utc(now))
        .on_conflict_do_nothing(index_elements=["id"])
    )
    session.execute(
        select(SqlRiskModelGeneration.id).where(SqlRiskModelGeneration.id == _GENERATION_ID).with_for_update()
    )


def _bump_generation(session: Session, now: datetime) -> None:
    session.execute(
        update(_GENERATION)
        .where(_GENERATION.c.id == _GENERATION_ID)
        .values(generation=_GENERATION.c.generation + 1, changed_at=_utc(now))
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
    return _summed_rowcount(session.connection().execute(statement).rowcount)


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
                created_at=_utc(now),
            )
        )
    append_event(session, actor=actor, action=method, subject=version, details=details, now=now)
