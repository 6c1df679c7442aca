"""Scoring writes: a batch of scores stored in one database transaction, and the reads around it.

Scoring is one database transaction per call: the customer row is locked first (``FOR NO KEY UPDATE`` on
PostgreSQL, SQLite's ``BEGIN IMMEDIATE`` serialises writers anyway), so concurrent scores of one customer
see each other's profile updates, and a retry of a transaction id finds the first answer. The unique index
on ``transaction_id`` backs this up across customers and replicas.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, cast

from sqlalchemy import and_, bindparam, case, distinct, func, insert, select, update

from posguard_server.domain.customers import CustomerNumber, ExternalRef
from posguard_server.domain.dynamic_codes import PresentedCode
from posguard_server.domain.enumeration import FailureLimit
from posguard_server.domain.errors import Aborted, AlreadyExists, InvalidArgument, NotFound, PosguardError
from posguard_server.domain.policy import NumberSignals
from posguard_server.domain.risk import (
    Answer,
    Channel,
    Decision,
    Evaluation,
    ModelScope,
    NewTransaction,
    Outcome,
    ProfileSnapshot,
    StoredTransaction,
    TransactionSource,
)
from posguard_server.store.cases import case_row, insert_cases
from posguard_server.store.customers import SqlCustomer, externals_later, numbers_later, primaries_later
from posguard_server.store.driver import DriverConnection, Later, Runs
from posguard_server.store.dynamic_codes import Attempt, OpenKey, RedemptionAnswer, enrolment_owners
from posguard_server.store.idempotency import SqlIdempotencyKey
from posguard_server.store.policy import number_signals, places_seen
from posguard_server.store.redemptions import redeem_in
from posguard_server.store.risk_tables import (
    ATTEMPTS,
    CHUNK,
    FRAUD_LABELS,
    PROFILE_VALUES,
    PROFILES,
    TRANSACTIONS,
    SqlRiskTransaction,
    chunks,
    reasons_from_json,
    reasons_json,
    request_conflict,
    summed_rowcount,
    transaction_values,
)
from posguard_server.store.schema import utc

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement, Select, Table

    from posguard_server.store.db import Database

_T = SqlRiskTransaction
_TX, _PROFILES = TRANSACTIONS, PROFILES


# (customers with fraud reported, customers) at the transaction's place in the feedback window; see
# ``SqlScoringStore.place_activity``. None when no place was asked for.
PlaceActivity = tuple[int, int]


class Prepared(Protocol):
    """What the scorer made of one transaction before the batch is scored: the customer's profile after it.

    An ``Evaluation`` is one (already decided); the engine's own carries what ``Finish`` needs.
    """

    @property
    def new_state(self) -> bytes | None: ...

    @property
    def counts_in_history(self) -> bool: ...


class Evaluate(Protocol):
    """The profile the scorer saw (None for a customer without one), the place's activity → its features.

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
    ) -> Prepared: ...


class Finish(Protocol):
    """Scores prepared transactions at once: one ``Evaluation`` each, in order."""

    def __call__(self, prepared: Sequence[Prepared], /) -> Sequence[Evaluation]: ...


def evaluated(prepared: Sequence[Prepared]) -> list[Evaluation]:
    """The ``Finish`` of items whose ``evaluate`` decides at once (returns an ``Evaluation``)."""
    if not all(isinstance(item, Evaluation) for item in prepared):
        raise TypeError("items that prepare must be finished by their scorer's finish")
    return cast(list[Evaluation], list(prepared))


# A stored transaction and whether it was an earlier answer replayed.
Scored = tuple[StoredTransaction, bool]


@dataclass(frozen=True, slots=True)
class ScoreItem:
    """One transaction to score: ``evaluate`` (then the batch's ``Finish``) runs inside the transaction, with
    the customer locked."""

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
    # Who sent it: ``request_id`` is this caller's own idempotency key (see store.idempotency).
    caller: str = ""


def _transaction_conflict(message: str) -> InvalidArgument:
    return InvalidArgument.field("transaction.transaction_id", message, reason="IDEMPOTENCY_CONFLICT")


# The decisions that open a review case unless the store is told otherwise (setting cases_on_decline).
CASE_DECISIONS = frozenset({Decision.REVIEW})


class SqlScoringStore:
    """Scores stored with their answers and profile updates, and the reads that check or explain them.

    A transaction decided one of ``case_decisions`` opens a review case in the same transaction.
    """

    def __init__(self, database: Database, *, case_decisions: frozenset[Decision] = CASE_DECISIONS) -> None:
        self._db = database
        self._case_decisions = case_decisions

    def score(
        self,
        record: NewTransaction,
        *,
        fingerprint: str,
        request_id: str,
        evaluate: Evaluate,
        now: datetime,
        place_since: datetime | None = None,
        finish: Finish,
        caller: str = "",
    ) -> Scored:
        """Score and store one transaction and update the customer's profile, all in one transaction.

        Returns ``(stored, replayed)``. A retry of ``record.transaction_id`` with the same ``fingerprint``
        returns the stored answer and changes nothing, also when it raced the original on another replica.
        ``evaluate`` runs inside the transaction with the customer locked: it must be quick, must not touch
        the database, and may be called again if the write lost a race. ``request_id`` "" means none.
        """
        (result,) = self.score_many(
            [ScoreItem(record, fingerprint, request_id, evaluate, place_since, caller=caller)],
            now=now,
            finish=finish,
        )
        if isinstance(result, PosguardError):
            raise result
        return result

    def score_many(
        self, items: Sequence[ScoreItem], *, now: datetime, finish: Finish
    ) -> list[Scored | PosguardError]:
        """``score`` for several transactions, in order, committed together: one commit, one sync to disk.

        An item that is refused (unknown customer, idempotency conflict) is returned as its error and
        changes nothing; the others are stored. Each item sees what the items before it stored. Errors of
        the whole transaction (the database is unavailable, a bug in ``evaluate``) raise, and then nothing of
        the batch was stored.
        """
        for attempt in range(ATTEMPTS):
            try:
                with self.scoring_unit() as unit:
                    with unit.together():  # one round trip on PostgreSQL
                        unit.load_earlier(
                            [item.record.transaction_id for item in items],
                            [(item.caller, item.request_id) for item in items],
                        )
                        unit.lock_customers({item.record.customer_id for item in items})
                    return unit.score(items, now=now, finish=finish)
            except (AlreadyExists, Aborted):
                # A concurrent call (another replica) stored one of these transaction ids or request ids, or
                # a profile, first; the re-run finds its row and replays it, or reports the conflict.
                if attempt == ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    @contextmanager
    def scoring_unit(self) -> Iterator[ScoringUnit]:
        """One database transaction to resolve, lock, redeem, score and store a batch in; see ScoringUnit."""
        with self._db.statements_unit() as connection:
            yield ScoringUnit(connection, self._case_decisions)

    def get_transaction(self, transaction_id: str) -> StoredTransaction | None:
        with self._db.session(read_only=True) as session:
            row = session.scalar(select(_T).where(_T.transaction_id == transaction_id))
            return _stored(row) if row is not None else None

    def place_activity(
        self, *, terminal_id: str, merchant_id: str, since: datetime, until: datetime
    ) -> tuple[int, int]:
        """``(customers with fraud reported by until, customers)`` who paid at a place in ``[since, until)``.

        The place is the terminal, or the merchant when there is no terminal id: the key training's label
        feedback uses. Fraud means FRAUD or CHARGEBACK reported at or before ``until``. Counts transactions
        that are in history, like the training data.
        """
        with self._db.session(read_only=True) as session:
            return _place_activity(session.connection(), terminal_id, merchant_id, since, until)


class ScoringUnit:
    """A batch of scores in one open database transaction: what decides each score is read in it.

    The caller loads the stored transactions the batch names, reads whom it names, locks those customers
    (``lock_customers``, once, in one order), reads again what may have changed before the lock (a number's
    status, an external id's link), redeems dynamic codes and stores the answers with ``score``. Nothing is
    kept unless the whole block commits.

    Reads are sent when asked for and read when their value is (``Later``): a caller sends the reads of one
    step inside ``together()`` and reads them after it, so that on PostgreSQL they share one round trip.
    ``score`` sends its writes together too. A batch of scores by number then makes four round trips: the
    first reads (with BEGIN), the lock and the reads under it, the writes, and COMMIT.

    The statements are SQLAlchemy Core, built once, run through the driver itself (psycopg or sqlite3;
    ``Database.statements_unit``): no ORM objects, no unit of work, no reading back what was just written. A
    batch's transactions go in one executemany, its profiles in one more, and the review cases its decisions
    open (``case_decisions``) in one more, all sent together.
    """

    def __init__(
        self, connection: DriverConnection, case_decisions: frozenset[Decision] = CASE_DECISIONS
    ) -> None:
        self._case_decisions = case_decisions
        self._connection = connection
        # SQLite's units begin with the database's write lock (BEGIN IMMEDIATE, store.db): nothing they read
        # can change before they end, so what they read before lock_customers need not be read again.
        self.locked_from_start = self._connection.dialect.name == "sqlite"
        self._earlier = Later.known(_Earlier({}, {}))
        self._locked: Later[set[str]] = Later.known(set())
        self._profiles: Later[_Profiles] = Later.known(_Profiles({}))

    def together(self) -> AbstractContextManager[None]:
        """Send the block's reads together (one round trip on PostgreSQL); read their values after it."""
        return self._connection.together()

    def load_earlier(self, transaction_ids: Iterable[str], request_keys: Iterable[tuple[str, str]]) -> None:
        """Send the reads of the stored transactions and the (caller, request_id) keys the batch names."""
        self._earlier = _Earlier.load(self._connection, transaction_ids, request_keys)

    def replay_of(
        self, transaction_id: str, fingerprint: str, caller: str, request_id: str
    ) -> StoredTransaction | None:
        """The stored transaction a retry replays; None for a new one; InvalidArgument on a conflict."""
        return self._earlier.get().check(transaction_id, fingerprint, caller, request_id)

    def lock_customers(self, customer_ids: set[str]) -> Later[set[str]]:
        """Lock the customers until commit; those that exist. Called once per unit, so the order holds.

        Their profiles are read with the lock (after it, in the same round trip), for ``score``.
        """
        self._locked = _lock_customers(self._connection, customer_ids)
        self._profiles = _Profiles.load(self._connection, customer_ids)
        return self._locked

    def numbers(self, numbers: Collection[str]) -> Later[dict[str, tuple[CustomerNumber, str]]]:
        return numbers_later(self._connection, numbers)

    def primaries(self, customer_ids: Collection[str]) -> Later[dict[str, CustomerNumber]]:
        return primaries_later(self._connection, customer_ids)

    def externals(self, refs: Collection[ExternalRef]) -> Later[dict[ExternalRef, str]]:
        return externals_later(self._connection, refs)

    def enrolment_owners(self, handles: Collection[str]) -> Later[dict[str, str]]:
        return enrolment_owners(self._connection, handles)

    def places_seen(
        self, customers: set[str], merchants: set[str], terminals: set[str]
    ) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
        """For rules: which (customer, merchant) and (customer, terminal) pairs history already holds."""
        return places_seen(self._connection, customers, merchants, terminals)

    def number_signals(self, customers: set[str], now: datetime) -> dict[str, NumberSignals]:
        """For rules: what the customers' numbers say (failed verifications, replays, rotation)."""
        return number_signals(self._connection, customers, now)

    def redeem(
        self,
        code: PresentedCode,
        attempt: Attempt,
        *,
        open_key: OpenKey,
        code_limit: FailureLimit,
        now: datetime,
        now_step: int,
    ) -> RedemptionAnswer:
        return redeem_in(
            self._connection,
            code,
            attempt,
            open_key=open_key,
            code_limit=code_limit,
            now=now,
            now_step=now_step,
        )

    def score(
        self, items: Sequence[ScoreItem], *, now: datetime, finish: Finish
    ) -> list[Scored | PosguardError]:
        """Store each item with its answer, in order, among the customers locked; one result per item.

        Each item's features are prepared in order (an item sees the profile the items before it left), then
        ``finish`` scores them together. A batch is split only where an item must see an earlier one stored:
        a retry of it, or a place-activity read where it paid.
        """
        connection, earlier, known = self._connection, self._earlier.get(), self._locked.get()
        results: list[Scored | PosguardError | None] = [None] * len(items)
        scored_at = utc(now)
        profiles = self._profiles.get()
        waiting: list[tuple[int, ScoreItem, Prepared]] = []  # prepared, not yet scored
        rows: list[dict[str, Any]] = []  # scored, not yet written
        cases: list[dict[str, Any]] = []  # the review cases of those rows
        case_decisions = self._case_decisions
        # What waits or is unwritten: the transaction ids, and the places they paid at.
        ids_pending: set[str] = set()
        places_pending: set[tuple[str, str]] = set()

        def settle(*, write: bool) -> None:
            evaluations = finish([prepared for _, _, prepared in waiting]) if waiting else []
            for (slot, item, _), evaluation in zip(waiting, evaluations, strict=True):
                stored = _scored_transaction(item.record, evaluation, scored_at)
                values = _scored_values(stored, evaluation, item)
                rows.append(values)
                if evaluation.decision in case_decisions:
                    cases.append(
                        case_row(
                            transaction_id=item.record.transaction_id,
                            customer_id=item.record.customer_id,
                            decision=evaluation.decision,
                            risk_score=evaluation.risk_score,
                            reasons=evaluation.reasons,
                            reasons_stored=values["reasons"],
                            opened_at=scored_at,
                        )
                    )
                earlier.add(stored, item.fingerprint)
                if evaluation.new_state is not None:
                    profiles.count(item.record, evaluation, scored_at)
                results[slot] = (stored, False)
            waiting.clear()
            ids_pending.clear()
            if write:
                _insert_transactions(connection, rows)
                insert_cases(connection, cases)  # after their transactions, which they reference
                rows.clear()
                cases.clear()
                places_pending.clear()

        for slot, item in enumerate(items):
            record = item.record
            if record.customer_id not in known:
                results[slot] = NotFound("no such customer", reason="CUSTOMER_NOT_FOUND")
                continue
            if record.transaction_id in ids_pending:
                settle(write=False)  # a retry within the batch replays the answer, once there is one
            try:
                replay = earlier.check(record.transaction_id, item.fingerprint, item.caller, item.request_id)
            except InvalidArgument as conflict:
                results[slot] = conflict
                continue
            if replay is not None:
                # The request_id of a retry is the caller's key for this transaction from now on too.
                earlier.record(item, record.customer_id, scored_at)
                results[slot] = (replay, True)
                continue
            place = shadow_place = None
            if item.place_since is not None or item.shadow_place_since is not None:
                if _place_key(record) in places_pending:
                    # An earlier item of this batch paid here: it must count, so store it first.
                    settle(write=True)
                until = utc(record.event_time)
                if item.place_since is not None:
                    place = _place_activity(
                        connection, record.terminal_id, record.merchant_id, item.place_since, until
                    )
                if item.shadow_place_since is not None:
                    shadow_place = _place_activity(
                        connection, record.terminal_id, record.merchant_id, item.shadow_place_since, until
                    )
            profile = profiles.get(record.customer_id)
            snapshot = profile.snapshot() if profile is not None else None
            if item.shadow_place_since is None:
                prepared = item.evaluate(snapshot, place)
            else:
                prepared = item.evaluate(snapshot, place, shadow_place=shadow_place)
            if prepared.new_state is not None:
                profiles.advance(record.customer_id, prepared.new_state)
            earlier.record(item, record.customer_id, scored_at)
            waiting.append((slot, item, prepared))
            ids_pending.add(record.transaction_id)
            places_pending.add(_place_key(record))
        with connection.together():
            settle(write=True)
            profiles_written = profiles.write(connection)
            earlier.write(connection)
        profiles_written.get()
        done = [result for result in results if result is not None]
        assert len(done) == len(items)
        return done


def _scored_transaction(
    record: NewTransaction, evaluation: Evaluation, scored_at: datetime
) -> StoredTransaction:
    """The transaction as it is stored and as its replay will read it back (times in UTC)."""
    if record.event_time.tzinfo is not UTC:  # requests' times are UTC already: no copy of the record
        record = replace(record, event_time=utc(record.event_time))
    return StoredTransaction(
        transaction=record,
        source=TransactionSource.SCORE,
        answer=Answer(
            risk_score=evaluation.risk_score,
            decision=evaluation.decision,
            reasons=tuple(evaluation.reasons),
            model_scope=evaluation.model_scope,
            model_version=evaluation.model_version,
            history_size=evaluation.history_size,
            cold_start=evaluation.cold_start,
            scored_at=scored_at,
        ),
        in_history=evaluation.counts_in_history,
        features=evaluation.features,
        outcome=None,
        outcome_at=None,
    )


def _scored_values(stored: StoredTransaction, evaluation: Evaluation, item: ScoreItem) -> dict[str, Any]:
    answer = stored.answer
    assert answer is not None
    # Both or neither: a version without a score would count as compared.
    has_shadow = bool(evaluation.shadow_version) and evaluation.shadow_risk_score is not None
    return {
        **transaction_values(stored.transaction, TransactionSource.SCORE, stored.in_history),
        "fingerprint": item.fingerprint,
        "request_id": item.request_id or None,
        "scored_at": answer.scored_at,
        "risk_score": answer.risk_score,
        "decision": answer.decision.value,
        "reasons": reasons_json(answer.reasons),
        "model_scope": answer.model_scope.value,
        "model_version": answer.model_version,
        "history_size": answer.history_size,
        "cold_start": answer.cold_start,
        "features": stored.features,
        "shadow_version": evaluation.shadow_version if has_shadow else None,
        "shadow_risk_score": evaluation.shadow_risk_score if has_shadow else None,
    }


# Every column a scored row sets, so that every row of an executemany has the same keys.
_INSERT_TRANSACTION = insert(_TX)


def _insert_transactions(connection: Runs, rows: list[dict[str, Any]]) -> None:
    if rows:
        connection.execute(_INSERT_TRANSACTION, rows)


def _place_key(record: NewTransaction) -> tuple[str, str]:
    """Where label feedback counts a transaction: its terminal, or its merchant when it has none."""
    return (record.terminal_id, "") if record.terminal_id else ("", record.merchant_id)


def _place_query(place: ColumnElement[bool]) -> Select[int, int]:
    fraud = and_(_T.outcome.in_(FRAUD_LABELS), _T.outcome_at <= bindparam("until"))
    return select(
        func.count(distinct(case((fraud, _T.customer_id)))),
        func.count(distinct(_T.customer_id)),
    ).where(
        place,
        _T.event_time >= bindparam("since"),
        _T.event_time < bindparam("until"),
        _T.in_history.is_(True),
    )


_TERMINAL_ACTIVITY = _place_query(_T.terminal_id == bindparam("terminal_id"))
_MERCHANT_ACTIVITY = _place_query(and_(_T.terminal_id == "", _T.merchant_id == bindparam("merchant_id")))


def _place_activity(
    connection: Runs, terminal_id: str, merchant_id: str, since: datetime, until: datetime
) -> PlaceActivity:
    if terminal_id:
        statement, key = _TERMINAL_ACTIVITY, {"terminal_id": terminal_id}
    else:
        statement, key = _MERCHANT_ACTIVITY, {"merchant_id": merchant_id}
    frauds, customers = connection.execute(statement, {**key, "since": since, "until": until}).one()
    return int(frauds), int(customers)


_LOCK_CUSTOMERS = (
    select(SqlCustomer.customer_id)
    .where(SqlCustomer.customer_id.in_(bindparam("customers", expanding=True)))
    .order_by(SqlCustomer.customer_id)
    .with_for_update(key_share=True)
)


def _lock_customers(connection: Runs, customer_ids: set[str]) -> Later[set[str]]:
    """Lock the customers' rows until commit, so one customer's scores run one after the other; ids found.

    Rows are locked in id order, so batches that share customers wait for each other instead of deadlocking.
    ``FOR NO KEY UPDATE`` (not ``FOR UPDATE``) still lets other transactions insert rows that reference the
    customer (numbers, enrolments) meanwhile. SQLite ignores it: ``BEGIN IMMEDIATE`` serialises writers.
    """
    sent = [
        connection.execute(_LOCK_CUSTOMERS, {"customers": chunk})
        for chunk in chunks(sorted(customer_ids), CHUNK)
    ]
    return Later(lambda: {row[0] for rows in sent for row in rows})


_EARLIER = select(_TX).where(_T.transaction_id.in_(bindparam("ids", expanding=True)))
_KEYS = cast("Table", SqlIdempotencyKey.__table__)
# The request ids of scores, kept as idempotency keys whose fingerprint is the transaction's: a request_id
# names one transaction for its caller, whether the call stored it or replayed it by its transaction id.
SCORED = "risk.scored"
_USED_REQUEST_IDS = select(_KEYS.c.caller, _KEYS.c.request_id, _KEYS.c.fingerprint).where(
    _KEYS.c.method == SCORED, _KEYS.c.request_id.in_(bindparam("ids", expanding=True))
)
_INSERT_KEYS = insert(_KEYS)


@dataclass(frozen=True, slots=True)
class _Known:
    """A stored transaction as far as a retry's check needs it."""

    source: TransactionSource
    fingerprint: str | None
    stored: StoredTransaction


class _Earlier:
    """The stored transactions and request ids a batch names, kept up to date as it stores."""

    def __init__(self, rows: dict[str, _Known], request_ids: dict[tuple[str, str], str]) -> None:
        self._rows = rows
        # (caller, request_id) → the fingerprint of the transaction it names
        self._request_ids = request_ids
        self._new_keys: list[dict[str, Any]] = []

    @classmethod
    def load(
        cls, connection: Runs, transaction_ids: Iterable[str], request_keys: Iterable[tuple[str, str]]
    ) -> Later[_Earlier]:
        ids = sorted(set(transaction_ids))
        keys = {(caller, request_id) for caller, request_id in request_keys if request_id}
        wanted = sorted({request_id for _, request_id in keys})
        transactions = [connection.execute(_EARLIER, {"ids": chunk}) for chunk in chunks(ids, CHUNK)]
        request_ids = [
            connection.execute(_USED_REQUEST_IDS, {"ids": chunk}) for chunk in chunks(wanted, CHUNK)
        ]

        def read() -> _Earlier:
            rows: dict[str, _Known] = {}
            used: dict[tuple[str, str], str] = {}
            for result in transactions:
                for row in result:
                    stored = _stored(cast(SqlRiskTransaction, row))  # a Core row has the class's attributes
                    rows[row.transaction_id] = _Known(stored.source, row.fingerprint, stored)
            for result in request_ids:
                for caller, request_id, fingerprint in result:
                    if (caller, request_id) in keys:
                        used[caller, request_id] = fingerprint
            return cls(rows, used)

        return Later(read)

    def check(
        self, transaction_id: str, fingerprint: str, caller: str, request_id: str
    ) -> StoredTransaction | None:
        """The stored transaction a call retries; None for a new one; InvalidArgument on a conflict."""
        known = self._rows.get(transaction_id)
        if known is not None:
            if known.source is not TransactionSource.SCORE:
                # Imported history has no stored answer to replay, and scoring it again would duplicate it.
                raise _transaction_conflict("belongs to imported history")
            if known.fingerprint != fingerprint:
                raise _transaction_conflict("was already used for a different transaction")
        named = self._request_ids.get((caller, request_id)) if request_id else None
        if named is not None and named != fingerprint:
            raise request_conflict("was already used for a different transaction")
        return known.stored if known is not None else None

    def record(self, item: ScoreItem, customer_id: str, now: datetime) -> None:
        """Keep the item's request_id (if new) as its caller's key for the item's transaction."""
        key = (item.caller, item.request_id)
        if not item.request_id or key in self._request_ids:
            return
        self._request_ids[key] = item.fingerprint
        self._new_keys.append(
            {
                "method": SCORED,
                "request_id": item.request_id,
                "caller": item.caller,
                "fingerprint": item.fingerprint,
                "customer_id": customer_id,
                "result_number": None,
                "created_at": now,
            }
        )

    def add(self, stored: StoredTransaction, fingerprint: str) -> None:
        self._rows[stored.transaction.transaction_id] = _Known(TransactionSource.SCORE, fingerprint, stored)

    def write(self, connection: Runs) -> None:
        """Store the keys recorded since the last write (a concurrent writer of one makes this fail)."""
        if self._new_keys:
            connection.execute(_INSERT_KEYS, self._new_keys)
            self._new_keys = []


@dataclass(slots=True)
class _Profile:
    """A customer's profile row as read (``version`` None: no row yet) and as the batch moves it on."""

    customer_id: str
    state: bytes
    transaction_count: int
    first_seen: datetime | None
    last_seen: datetime | None
    declines: int
    reviews: int
    version: int | None
    updated_at: datetime | None = None

    def snapshot(self) -> ProfileSnapshot:
        return ProfileSnapshot(
            state=self.state,
            transaction_count=self.transaction_count,
            first_seen=self.first_seen,
            last_seen=self.last_seen,
            declines=self.declines,
            reviews=self.reviews,
        )

    def values(self) -> dict[str, Any]:
        return {"customer_id": self.customer_id, **{name: getattr(self, name) for name in PROFILE_VALUES}}


_PROFILE_ROWS = select(_PROFILES).where(_PROFILES.c.customer_id.in_(bindparam("customers", expanding=True)))
_INSERT_PROFILE = insert(_PROFILES).values(version=0)
# Names the version read: a writer that read the same version and committed first leaves no row to update.
_UPDATE_PROFILE = (
    update(_PROFILES)
    .where(
        _PROFILES.c.customer_id == bindparam("b_customer_id"), _PROFILES.c.version == bindparam("b_version")
    )
    .values(
        {
            **{name: bindparam(name) for name in PROFILE_VALUES},
            "version": _PROFILES.c.version + 1,
        }
    )
)


class _Profiles:
    """The batch's customers' profiles: read once, moved on in memory, written once at the end."""

    def __init__(self, profiles: dict[str, _Profile]) -> None:
        self._profiles = profiles
        self._changed: set[str] = set()

    @classmethod
    def load(cls, connection: Runs, customer_ids: set[str]) -> Later[_Profiles]:
        sent = [
            connection.execute(_PROFILE_ROWS, {"customers": chunk})
            for chunk in chunks(sorted(customer_ids), CHUNK)
        ]

        def read() -> _Profiles:
            found: dict[str, _Profile] = {}
            for result in sent:
                for row in result:
                    found[row.customer_id] = _Profile(
                        row.customer_id,
                        row.state,
                        row.transaction_count,
                        row.first_seen,
                        row.last_seen,
                        row.declines,
                        row.reviews,
                        row.version,
                    )
            return cls(found)

        return Later(read)

    def get(self, customer_id: str) -> _Profile | None:
        return self._profiles.get(customer_id)

    def advance(self, customer_id: str, new_state: bytes) -> None:
        """The customer's profile state after a transaction, for the next one of the batch to start from."""
        profile = self._profiles.get(customer_id)
        if profile is None:
            profile = _Profile(customer_id, b"", 0, None, None, 0, 0, None)
            self._profiles[customer_id] = profile
        self._changed.add(customer_id)
        profile.state = new_state

    def count(self, record: NewTransaction, evaluation: Evaluation, scored_at: datetime) -> None:
        """The profile's counters moved on by a scored transaction (after ``advance``)."""
        profile = self._profiles[record.customer_id]
        profile.updated_at = scored_at
        if evaluation.counts_in_history:
            event_time = utc(record.event_time)
            profile.transaction_count += 1
            # Transactions can arrive out of event-time order (a gateway's retries, a late batch).
            first, last = profile.first_seen, profile.last_seen
            profile.first_seen = event_time if first is None else min(first, event_time)
            profile.last_seen = event_time if last is None else max(last, event_time)
        if evaluation.decision is Decision.DECLINE:
            profile.declines += 1
        elif evaluation.decision is Decision.REVIEW:
            profile.reviews += 1

    def write(self, connection: Runs) -> Later[None]:
        """Insert the new profiles and update the others, each naming the version it read; checked when asked
        for (Aborted if another writer moved one on first)."""
        changed = [self._profiles[customer_id] for customer_id in sorted(self._changed)]
        new = [profile.values() for profile in changed if profile.version is None]
        moved = [
            {**profile.values(), "b_customer_id": profile.customer_id, "b_version": profile.version}
            for profile in changed
            if profile.version is not None
        ]
        if new:
            # A profile made meanwhile by another writer fails this with a unique violation: the batch is
            # then run again and reads it.
            connection.execute(_INSERT_PROFILE, new)
        self._changed.clear()
        if not moved:
            return Later.known(None)
        result = connection.execute(_UPDATE_PROFILE, moved)

        def check() -> None:
            if summed_rowcount(result.rowcount) != len(moved):
                raise Aborted(
                    "a customer's risk profile changed while this batch was scored; retry",
                    reason="PROFILE_CHANGED",
                )

        return Later(check)


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
            reasons=reasons_from_json(row.reasons),
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
