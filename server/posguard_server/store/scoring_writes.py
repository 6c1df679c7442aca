"""Scoring writes: a batch of scores stored in one database transaction, and the reads around it.

Scoring is one database transaction per call: the customer row is locked first (``FOR NO KEY UPDATE`` on
PostgreSQL, SQLite's ``BEGIN IMMEDIATE`` serialises writers anyway), so concurrent scores of one customer
see each other's profile updates, and a retry of a transaction id finds the first answer. The unique index
on ``transaction_id`` backs this up across customers and replicas.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import and_, case, distinct, func, select

from posguard_server.domain.customers import CustomerNumber, ExternalRef
from posguard_server.domain.dynamic_codes import PresentedCode
from posguard_server.domain.errors import AlreadyExists, InvalidArgument, NotFound, PosguardError
from posguard_server.domain.risk import (
    Answer,
    Channel,
    Decision,
    Evaluation,
    ModelScope,
    NewTransaction,
    Outcome,
    ProfileSnapshot,
    StoredReason,
    StoredTransaction,
    TransactionSource,
)
from posguard_server.store.customers import SqlCustomer, externals_in, numbers_in, primaries_in
from posguard_server.store.dynamic_codes import (
    Attempt,
    OpenKey,
    RedemptionAnswer,
    enrolment_owners,
    redeem_in,
)
from posguard_server.store.risk_tables import (
    ATTEMPTS,
    CHUNK,
    FRAUD_LABELS,
    SqlRiskProfile,
    SqlRiskTransaction,
    chunks,
    profile_snapshot,
    request_conflict,
    transaction_values,
    utc,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from posguard_server.store.db import Database

_T = SqlRiskTransaction


# (customers with fraud reported, customers) at the transaction's place in the feedback window; see
# ``SqlScoringStore.place_activity``. None when no place was asked for.
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


class SqlScoringStore:
    """Scores stored with their answers and profile updates, and the reads that check or explain them."""

    def __init__(self, database: Database) -> None:
        self._db = database

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
        for attempt in range(ATTEMPTS):
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
                if attempt == ATTEMPTS - 1:
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
                            utc(record.event_time),
                        )
                    if item.shadow_place_since is not None:
                        shadow_place = _place_activity(
                            session,
                            record.terminal_id,
                            record.merchant_id,
                            item.shadow_place_since,
                            utc(record.event_time),
                        )
            snapshot = profile_snapshot(profile) if profile is not None else None
            if item.shadow_place_since is None:
                evaluation = item.evaluate(snapshot, place)
            else:
                evaluation = item.evaluate(snapshot, place, shadow_place=shadow_place)
            # Both or neither: a version without a score would count as compared.
            has_shadow = bool(evaluation.shadow_version) and evaluation.shadow_risk_score is not None
            row = SqlRiskTransaction(
                **transaction_values(record, TransactionSource.SCORE, evaluation.counts_in_history),
                fingerprint=item.fingerprint,
                request_id=item.request_id or None,
                scored_at=utc(now),
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
    fraud = and_(_T.outcome.in_(FRAUD_LABELS), _T.outcome_at <= until)
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
    for chunk in chunks(sorted(customer_ids), CHUNK):
        found.update(
            session.scalars(
                select(SqlCustomer.customer_id)
                .where(SqlCustomer.customer_id.in_(chunk))
                .order_by(SqlCustomer.customer_id)
                .with_for_update(key_share=True)
            )
        )
    return found


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
        for chunk in chunks(ids, CHUNK):
            rows.update(
                (row.transaction_id, row)
                for row in session.scalars(select(_T).where(_T.transaction_id.in_(chunk)))
            )
        for chunk in chunks(wanted, CHUNK):
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
            raise request_conflict("was already used for a different transaction")
        return None

    def add(self, row: SqlRiskTransaction) -> None:
        self._rows[row.transaction_id] = row
        if row.request_id:
            self._request_ids.add(row.request_id)


def _profiles(session: Session, customer_ids: set[str]) -> dict[str, SqlRiskProfile]:
    found: dict[str, SqlRiskProfile] = {}
    for chunk in chunks(sorted(customer_ids), CHUNK):
        found.update(
            (p.customer_id, p)
            for p in session.scalars(select(SqlRiskProfile).where(SqlRiskProfile.customer_id.in_(chunk)))
        )
    return found


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
    profile.updated_at = utc(now)
    if evaluation.counts_in_history:
        event_time = utc(record.event_time)
        profile.transaction_count += 1
        # Transactions can arrive out of event-time order (a gateway's retries, a late batch).
        profile.first_seen = event_time if profile.first_seen is None else min(profile.first_seen, event_time)
        profile.last_seen = event_time if profile.last_seen is None else max(profile.last_seen, event_time)
    if evaluation.decision is Decision.DECLINE:
        profile.declines += 1
    elif evaluation.decision is Decision.REVIEW:
        profile.reviews += 1
    return profile


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
