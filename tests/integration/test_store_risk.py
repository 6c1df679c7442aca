"""The risk stores on SQLite and PostgreSQL: scoring, history, outcomes, profiles and the model registry."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import func, insert, select, update

from posguard_server.domain.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from posguard_server.domain.risk import (
    Channel,
    Decision,
    Evaluation,
    ModelScope,
    ModelStatus,
    NewModel,
    NewTransaction,
    Outcome,
    ProfileSnapshot,
    StoredReason,
    StoredTransaction,
    TransactionSource,
)
from posguard_server.store.audit import SqlAuditStore
from posguard_server.store.customers import SqlCustomer
from posguard_server.store.db import Database
from posguard_server.store.risk_tables import SqlRiskModel, SqlRiskProfile, SqlRiskTransaction
from posguard_server.store.scoring_writes import Evaluate, PlaceActivity, ScoreItem, evaluated

if TYPE_CHECKING:
    from ..conftest import RiskStores

T0 = datetime(2025, 3, 1, 8, 0, 0, 250000, tzinfo=UTC)
NOW = datetime(2025, 3, 2, 9, 30, 0, tzinfo=UTC)


@pytest.fixture
def store(database: Database, risk_stores: RiskStores) -> RiskStores:
    _add_customers(database, "c1", "c2", "c3")
    return risk_stores


def _add_customers(database: Database, *customer_ids: str) -> None:
    with database.session() as session:
        for customer_id in customer_ids:
            session.add(
                SqlCustomer(
                    customer_id=customer_id,
                    issuer="test",
                    created_at=T0,
                    updated_at=T0,
                    created_by="test",
                )
            )


def _tx(
    transaction_id: str, customer_id: str = "c1", *, minutes: int = 0, amount: int = 1250
) -> NewTransaction:
    return NewTransaction(
        transaction_id=transaction_id,
        customer_id=customer_id,
        event_time=T0 + timedelta(minutes=minutes),
        amount_minor=amount,
        currency="CNY",
        merchant_id=f"m{minutes % 3}",
        terminal_id=f"t{minutes % 2}",
        mcc="5411",
        channel=Channel.POS,
        latitude=30.59,
        longitude=114.31,
    )


def _counting(
    decision: Decision = Decision.APPROVE, *, counts: bool = True, keep_state: bool = False
) -> Evaluate:
    """A scorer whose profile state is the number of transactions it has seen: shows lost updates."""

    def evaluate(snapshot: ProfileSnapshot | None, place: PlaceActivity | None) -> Evaluation:
        seen = int(snapshot.state) if snapshot is not None else 0
        return Evaluation(
            risk_score=0.25 + seen / 1000,
            decision=decision,
            reasons=(StoredReason("AMOUNT_HIGH", "amount 6.2x this customer's median", 0.625),),
            model_scope=ModelScope.GLOBAL,
            model_version="g-1",
            history_size=seen,
            cold_start=True,
            features=b"\x00" * 16,
            new_state=None if keep_state else str(seen + 1).encode(),
            counts_in_history=counts,
        )

    return evaluate


def _score(
    store: RiskStores,
    record: NewTransaction,
    *,
    fingerprint: str = "f" * 64,
    request_id: str = "",
    evaluate: Evaluate | None = None,
) -> tuple[StoredTransaction, bool]:
    return store.scoring.score(
        record,
        fingerprint=fingerprint,
        request_id=request_id,
        evaluate=evaluate or _counting(),
        now=NOW,
        finish=evaluated,
    )


def _together(threads_n: int, work: Callable[[int], object]) -> list[BaseException]:
    """Run ``work(0)`` … ``work(threads_n - 1)`` on threads released at once; what they raised."""
    barrier = threading.Barrier(threads_n)
    errors: list[BaseException] = []

    def run(worker: int) -> None:
        barrier.wait()
        try:
            work(worker)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def _count(database: Database, model: type[SqlRiskTransaction | SqlRiskProfile | SqlRiskModel]) -> int:
    with database.session(read_only=True) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


# -- scoring -------------------------------------------------------------------------------------------


def test_score_stores_the_answer_and_updates_the_profile(store: RiskStores) -> None:
    stored, replayed = _score(store, _tx("tx-1", minutes=5), request_id="req-1")

    assert not replayed
    assert stored.source is TransactionSource.SCORE
    assert stored.transaction == _tx("tx-1", minutes=5)
    assert stored.answer is not None
    assert stored.answer.decision is Decision.APPROVE
    assert stored.answer.risk_score == 0.25
    assert stored.answer.reasons == (
        StoredReason("AMOUNT_HIGH", "amount 6.2x this customer's median", 0.625),
    )
    assert stored.answer.model_scope is ModelScope.GLOBAL
    assert stored.answer.scored_at == NOW
    assert stored.features == b"\x00" * 16
    assert store.scoring.get_transaction("tx-1") == stored

    _score(store, _tx("tx-2", minutes=1), evaluate=_counting(Decision.REVIEW))
    profile = store.profiles.profile("c1")
    assert profile == ProfileSnapshot(
        state=b"2",
        transaction_count=2,
        first_seen=T0 + timedelta(minutes=1),
        last_seen=T0 + timedelta(minutes=5),
        declines=0,
        reviews=1,
    )
    assert store.profiles.profile("c2") is None


def test_timestamps_come_back_in_utc(store: RiskStores) -> None:
    local = timezone(timedelta(hours=8))
    record = NewTransaction("tx-1", "c1", T0.astimezone(local), 100, "CNY", "m1")
    stored, _ = store.scoring.score(
        record,
        fingerprint="f",
        request_id="",
        evaluate=_counting(),
        now=NOW.astimezone(local),
        finish=evaluated,
    )
    assert stored.transaction.event_time.tzinfo is UTC
    assert stored == store.scoring.get_transaction("tx-1")


def test_replay_returns_the_stored_answer_and_changes_nothing(store: RiskStores, database: Database) -> None:
    first, _ = _score(store, _tx("tx-1"), request_id="req-1")
    profile = store.profiles.profile("c1")

    def never(snapshot: ProfileSnapshot | None, place: PlaceActivity | None) -> Evaluation:
        raise AssertionError("a replay must not score again")

    again, replayed = _score(store, _tx("tx-1"), request_id="req-other", evaluate=never)

    assert replayed
    assert again == first
    assert _count(database, SqlRiskTransaction) == 1
    assert store.profiles.profile("c1") == profile


def test_a_reused_transaction_id_with_another_fingerprint_is_a_conflict(store: RiskStores) -> None:
    _score(store, _tx("tx-1"))

    with pytest.raises(InvalidArgument) as caught:
        _score(store, _tx("tx-1", amount=999), fingerprint="e" * 64)

    assert caught.value.reason == "IDEMPOTENCY_CONFLICT"
    assert caught.value.violations[0].field == "transaction.transaction_id"


def test_scoring_an_imported_transaction_id_is_a_conflict(store: RiskStores) -> None:
    store.history.import_transactions([_tx("old-1")])

    with pytest.raises(InvalidArgument) as caught:
        _score(store, _tx("old-1"))

    assert caught.value.reason == "IDEMPOTENCY_CONFLICT"
    assert caught.value.violations[0].description == "belongs to imported history"


def test_a_request_id_reused_for_another_transaction_is_a_conflict(store: RiskStores) -> None:
    _score(store, _tx("tx-1"), request_id="req-1")

    with pytest.raises(InvalidArgument) as caught:
        _score(store, _tx("tx-2"), request_id="req-1", fingerprint="e" * 64)

    assert caught.value.reason == "IDEMPOTENCY_CONFLICT"
    assert caught.value.violations[0].field == "request_id"


def test_scoring_for_an_unknown_customer_is_not_found(store: RiskStores) -> None:
    with pytest.raises(NotFound):
        _score(store, _tx("tx-1", customer_id="nobody"))


def test_a_rule_decline_without_new_state_leaves_the_profile_alone(store: RiskStores) -> None:
    _score(store, _tx("tx-1"))
    before = store.profiles.profile("c1")

    stored, _ = _score(
        store, _tx("tx-2", minutes=9), evaluate=_counting(Decision.DECLINE, counts=False, keep_state=True)
    )

    assert stored.answer is not None
    assert stored.answer.decision is Decision.DECLINE
    assert not stored.in_history
    assert store.profiles.profile("c1") == before
    assert [b.transaction_ids for b in store.history.history()] == [("tx-1",)]
    summary = store.profiles.profile_summary("c1")
    assert (summary.transaction_count, summary.declines) == (1, 1)


def test_concurrent_retries_of_one_transaction_store_it_once(store: RiskStores, database: Database) -> None:
    threads_n = 6
    answers: list[tuple[StoredTransaction, bool]] = []

    assert _together(threads_n, lambda _: answers.append(_score(store, _tx("tx-race")))) == []
    assert _count(database, SqlRiskTransaction) == 1
    assert len({stored for stored, _ in answers}) == 1
    assert sorted(replayed for _, replayed in answers) == [False] + [True] * (threads_n - 1)
    profile = store.profiles.profile("c1")
    assert profile is not None
    assert (profile.transaction_count, profile.state) == (1, b"1")


def test_concurrent_scores_of_one_customer_are_serialised(store: RiskStores) -> None:
    threads_n, per_thread = 4, 5

    def run(worker: int) -> None:
        for i in range(per_thread):
            _score(store, _tx(f"tx-{worker}-{i}", minutes=i))

    assert _together(threads_n, run) == []
    profile = store.profiles.profile("c1")
    assert profile is not None
    # The state counts what each scorer saw: a lost update would leave it below the row count.
    assert profile.transaction_count == threads_n * per_thread
    assert profile.state == str(threads_n * per_thread).encode()


def test_a_profile_written_between_read_and_write_makes_the_batch_run_again(
    store: RiskStores, database: Database
) -> None:
    """The profile's version: a writer that does not take the customer's lock cannot be overwritten."""
    if database.dialect == "sqlite":
        pytest.skip("SQLite's writer lock leaves no room for a write in between")
    _score(store, _tx("tx-0"))
    other = Database(str(database.engine.url.render_as_string(hide_password=False)))
    calls: list[int] = []
    counting = _counting()

    def evaluate(snapshot: ProfileSnapshot | None, place: PlaceActivity | None) -> Evaluation:
        calls.append(1)
        if len(calls) == 1:
            # Another process rewrites the profile after this batch read it (the state as if it had seen 41).
            with other.session() as session:
                session.execute(
                    update(SqlRiskProfile)
                    .where(SqlRiskProfile.customer_id == "c1")
                    .values(state=b"41", version=SqlRiskProfile.version + 1)
                )
        return counting(snapshot, place)

    try:
        stored, replayed = _score(store, _tx("tx-1", minutes=1), evaluate=evaluate)
    finally:
        other.dispose()

    assert len(calls) == 2  # the first attempt found its version gone and ran again
    assert not replayed
    assert stored.answer is not None
    assert stored.answer.history_size == 41  # the second attempt saw the other write
    profile = store.profiles.profile("c1")
    assert profile is not None
    assert (profile.state, profile.transaction_count) == (b"42", 2)
    assert _count(database, SqlRiskTransaction) == 2


def test_score_many_commits_a_batch_and_isolates_refused_items(store: RiskStores, database: Database) -> None:
    _score(store, _tx("tx-0"))
    items = [
        ScoreItem(_tx("tx-1", minutes=1), "f" * 64, "", _counting()),
        ScoreItem(_tx("tx-2", customer_id="nobody", minutes=2), "f" * 64, "", _counting()),
        ScoreItem(_tx("tx-0", amount=999), "e" * 64, "", _counting()),  # the id of another transaction
        ScoreItem(_tx("tx-3", minutes=3), "f" * 64, "", _counting()),
        ScoreItem(_tx("tx-4", customer_id="c2", minutes=4), "f" * 64, "", _counting()),
        ScoreItem(_tx("tx-0"), "f" * 64, "", _counting()),  # a retry replays
    ]

    results = store.scoring.score_many(items, now=NOW, finish=evaluated)

    assert isinstance(results[1], NotFound)
    assert isinstance(results[2], InvalidArgument)
    assert results[2].reason == "IDEMPOTENCY_CONFLICT"
    stored = [r for r in results if isinstance(r, tuple)]
    assert [(s.transaction.transaction_id, replayed) for s, replayed in stored] == [
        ("tx-1", False),
        ("tx-3", False),
        ("tx-4", False),
        ("tx-0", True),
    ]
    # tx-3 saw tx-1 earlier in the same batch: the state counts every transaction of the customer.
    assert stored[1][0].answer is not None
    assert stored[1][0].answer.history_size == 2
    profile = store.profiles.profile("c1")
    assert profile is not None
    assert (profile.transaction_count, profile.state) == (3, b"3")
    assert _count(database, SqlRiskTransaction) == 4


def test_a_batch_that_fails_as_a_whole_stores_nothing(store: RiskStores, database: Database) -> None:
    def broken(snapshot: ProfileSnapshot | None, place: PlaceActivity | None) -> Evaluation:
        raise RuntimeError("scorer bug")

    items = [
        ScoreItem(_tx("tx-1"), "f" * 64, "", _counting()),
        ScoreItem(_tx("tx-2", minutes=2), "f" * 64, "", broken),
    ]

    with pytest.raises(RuntimeError):
        store.scoring.score_many(items, now=NOW, finish=evaluated)

    assert _count(database, SqlRiskTransaction) == 0
    assert store.profiles.profile("c1") is None


def test_place_activity_inside_a_batch_counts_earlier_items(store: RiskStores) -> None:
    seen: list[PlaceActivity | None] = []

    def recording(snapshot: ProfileSnapshot | None, place: PlaceActivity | None) -> Evaluation:
        seen.append(place)
        return _counting()(snapshot, place)

    since = T0 - timedelta(days=1)
    items = [
        ScoreItem(_tx(f"tx-{i}", customer_id=c, minutes=2 * i), "f" * 64, "", recording, since)
        for i, c in enumerate(["c1", "c2", "c3"])
    ]
    store.scoring.score_many(items, now=NOW, finish=evaluated)

    # All three pay at terminal t0 (even minutes): each sees the customers stored before it, in the batch.
    assert seen == [(0, 0), (0, 1), (0, 2)]


def test_concurrent_batches_over_the_same_customers_do_not_deadlock(store: RiskStores) -> None:
    threads_n, rounds = 4, 5

    def run(worker: int) -> None:
        # Each worker walks the customers in a different order: row locks taken in that order would deadlock.
        order = ["c1", "c2", "c3"][worker % 3 :] + ["c1", "c2", "c3"][: worker % 3]
        for r in range(rounds):
            items = [
                ScoreItem(_tx(f"tx-{worker}-{r}-{c}", c, minutes=r), "f" * 64, "", _counting()) for c in order
            ]
            results = store.scoring.score_many(items, now=NOW, finish=evaluated)
            assert all(isinstance(result, tuple) for result in results)

    assert _together(threads_n, run) == []
    for customer in ("c1", "c2", "c3"):
        profile = store.profiles.profile(customer)
        assert profile is not None
        assert profile.state == str(threads_n * rounds).encode()


# -- import and history --------------------------------------------------------------------------------


def test_import_is_idempotent_and_counts_new_rows(store: RiskStores, database: Database) -> None:
    rows = [_tx(f"h-{i}", "c1" if i % 2 else "c2", minutes=i) for i in range(1200)]

    assert store.history.import_transactions(rows[:700]) == 700
    assert store.history.import_transactions(rows) == 500
    assert store.history.import_transactions(rows) == 0
    assert store.history.import_transactions([_tx("dup"), _tx("dup", amount=5)]) == 1
    assert _count(database, SqlRiskTransaction) == 1201
    stored = store.scoring.get_transaction("h-3")
    assert stored is not None
    assert (stored.source, stored.answer, stored.in_history) == (TransactionSource.IMPORT, None, True)
    assert stored.transaction == rows[3]
    assert store.scoring.get_transaction("dup") is not None
    assert store.scoring.get_transaction("dup").transaction.amount_minor == 1250  # type: ignore[union-attr]


def test_import_for_an_unknown_customer_is_not_found_and_stores_nothing(
    store: RiskStores, database: Database
) -> None:
    with pytest.raises(NotFound) as caught:
        store.history.import_transactions([_tx("h-1"), _tx("h-2", customer_id="ghost")])
    assert caught.value.metadata == {"customer_id": "ghost"}
    assert _count(database, SqlRiskTransaction) == 0


def test_history_is_ordered_and_keeps_customers_whole(store: RiskStores) -> None:
    rows = [_tx(f"a-{i}", "c1", minutes=100 - i) for i in range(7)]
    rows += [_tx(f"b-{i}", "c2", minutes=i) for i in range(3)]
    rows += [_tx(f"c-{i}", "c3", minutes=i) for i in range(2)]
    store.history.import_transactions(rows)

    batches = list(store.history.history(batch_rows=3))

    seen = [tid for batch in batches for tid in batch.transaction_ids]
    assert seen == [f"a-{i}" for i in reversed(range(7))] + ["b-0", "b-1", "b-2", "c-0", "c-1"]
    for batch in batches:
        assert list(batch.event_times) == sorted(batch.event_times) or len(set(batch.customer_ids)) > 1
    customers_per_batch = [set(batch.customer_ids) for batch in batches]
    for i, first in enumerate(customers_per_batch):
        for later in customers_per_batch[i + 1 :]:
            assert not first & later
    batch = batches[0]
    assert batch.channels[0] is Channel.POS
    assert batch.amounts_minor[0] == 1250
    assert batch.latitudes[0] == 30.59
    assert batch.outcomes[0] is None
    assert len(batch) == len(batch.transaction_ids)


def test_history_filters(store: RiskStores) -> None:
    store.history.import_transactions([_tx(f"h-{i}", "c1" if i < 5 else "c2", minutes=i) for i in range(10)])
    store.outcomes.bulk_outcomes(
        [
            ("h-1", Outcome.FRAUD, NOW),
            ("h-2", Outcome.CHARGEBACK, NOW + timedelta(days=2)),
            ("h-3", Outcome.LEGITIMATE, NOW),
        ]
    )

    def ids(**kwargs: object) -> list[str]:
        return [tid for batch in store.history.history(**kwargs) for tid in batch.transaction_ids]  # type: ignore[arg-type]

    assert ids() == ["h-0", "h-3", "h-4", "h-5", "h-6", "h-7", "h-8", "h-9"]
    assert ids(exclude_labelled_fraud=False) == [f"h-{i}" for i in range(10)]
    # A label reported after the cut-off was not known then: the transaction stays.
    known = ids(labels_known_at=NOW + timedelta(days=1))
    assert known == ["h-0", "h-2", "h-3", "h-4", "h-5", "h-6", "h-7", "h-8", "h-9"]
    assert ids(until=T0 + timedelta(minutes=4)) == ["h-0", "h-3"]
    assert ids(customer_ids=["c2"]) == ["h-5", "h-6", "h-7", "h-8", "h-9"]
    assert ids(customer_ids=[]) == []
    labelled = next(iter(store.history.history(exclude_labelled_fraud=False)))
    assert labelled.outcomes[1:4] == (Outcome.FRAUD, Outcome.CHARGEBACK, Outcome.LEGITIMATE)
    assert labelled.outcome_ats[:4] == (None, NOW, NOW + timedelta(days=2), NOW)


def test_history_streams_a_customer_larger_than_a_batch(store: RiskStores) -> None:
    store.history.import_transactions([_tx(f"h-{i:02d}", "c1", minutes=i) for i in range(11)])
    store.history.import_transactions([_tx("x-0", "c2")])

    batches = list(store.history.history(batch_rows=4))

    assert [len(batch) for batch in batches] == [11, 1]
    assert batches[0].transaction_ids == tuple(f"h-{i:02d}" for i in range(11))


# -- outcomes ------------------------------------------------------------------------------------------


def test_report_outcome_is_idempotent_and_a_later_report_overwrites(store: RiskStores) -> None:
    _score(store, _tx("tx-1"))

    def report(outcome: Outcome, request_id: str, fingerprint: str = "a") -> tuple[object, bool]:
        return store.outcomes.report_outcome(
            "tx-1",
            outcome,
            reported_at=NOW + timedelta(hours=1),
            note="case 7",
            request_id=request_id,
            fingerprint=fingerprint,
            caller="gateway-1",
            now=NOW,
        )

    first, replayed = report(Outcome.LEGITIMATE, "r1")
    assert not replayed
    assert report(Outcome.LEGITIMATE, "r1") == (first, True)

    _, replayed = report(Outcome.CHARGEBACK, "r2", fingerprint="b")
    assert not replayed
    stored = store.scoring.get_transaction("tx-1")
    assert stored is not None
    assert stored.outcome is Outcome.CHARGEBACK
    assert stored.outcome_at == NOW + timedelta(hours=1)

    # A late retry of the first report replays it and does not write its label back.
    assert report(Outcome.LEGITIMATE, "r1") == (first, True)
    assert store.scoring.get_transaction("tx-1").outcome is Outcome.CHARGEBACK  # type: ignore[union-attr]

    with pytest.raises(InvalidArgument) as caught:
        report(Outcome.FRAUD, "r1", fingerprint="other")
    assert caught.value.reason == "IDEMPOTENCY_CONFLICT"
    assert caught.value.violations[0].field == "request_id"


def test_report_outcome_for_an_unknown_transaction_is_not_found(store: RiskStores) -> None:
    with pytest.raises(NotFound):
        store.outcomes.report_outcome(
            "nope",
            Outcome.FRAUD,
            reported_at=NOW,
            note="",
            request_id="r1",
            fingerprint="a",
            caller="gateway-1",
            now=NOW,
        )


def test_bulk_outcomes_and_labelled(store: RiskStores) -> None:
    store.history.import_transactions([_tx(f"h-{i}", minutes=i) for i in range(4)])

    matched = store.outcomes.bulk_outcomes(
        [
            ("h-0", Outcome.FRAUD, NOW),
            ("h-1", Outcome.LEGITIMATE, NOW),
            ("h-2", Outcome.CHARGEBACK, NOW + timedelta(days=1)),
            ("missing", Outcome.FRAUD, NOW),
        ]
    )

    assert matched == 3
    assert [item.transaction_id for item in store.outcomes.labelled()] == ["h-0", "h-2"]
    assert [item.transaction_id for item in store.outcomes.labelled(since=NOW + timedelta(hours=1))] == [
        "h-2"
    ]
    assert [item.transaction_id for item in store.outcomes.labelled(until=NOW + timedelta(hours=1))] == [
        "h-0"
    ]
    first = store.outcomes.labelled()[0]
    assert (first.customer_id, first.merchant_id, first.terminal_id) == ("c1", "m0", "t0")
    assert (first.outcome, first.outcome_at, first.event_time) == (Outcome.FRAUD, NOW, T0)


def test_place_activity_counts_customers_and_reported_fraud(store: RiskStores) -> None:
    def at(tid: str, customer: str, minutes: int, terminal: str, merchant: str = "m1") -> NewTransaction:
        return NewTransaction(tid, customer, T0 + timedelta(minutes=minutes), 100, "CNY", merchant, terminal)

    store.history.import_transactions(
        [
            at("a", "c1", 1, "t1"),
            at("b", "c2", 2, "t1"),
            at("c", "c2", 3, "t1"),
            at("d", "c3", 4, "t1"),
            at("e", "c3", 90, "t1"),  # after the window
            at("f", "c1", 5, "t2"),  # another terminal
            at("g", "c1", 6, ""),  # no terminal: its place is the merchant
            at("h", "c2", 7, "", merchant="m2"),
        ]
    )
    store.outcomes.bulk_outcomes(
        [("b", Outcome.FRAUD, T0 + timedelta(minutes=20)), ("d", Outcome.FRAUD, NOW)]
    )

    def activity(terminal: str, merchant: str = "m1") -> tuple[int, int]:
        return store.scoring.place_activity(
            terminal_id=terminal, merchant_id=merchant, since=T0, until=T0 + timedelta(minutes=30)
        )

    # c1, c2, c3 paid at t1 in the window; only c2's fraud was reported by its end.
    assert activity("t1") == (1, 3)
    assert activity("t2") == (0, 1)
    assert activity("") == (0, 1)
    assert activity("", "m2") == (0, 1)
    assert activity("t9") == (0, 0)


# -- profiles ------------------------------------------------------------------------------------------


def test_put_profiles_inserts_and_replaces(store: RiskStores, database: Database) -> None:
    one = ProfileSnapshot(b"s1", 3, T0, T0 + timedelta(days=1), declines=1, reviews=2)
    two = ProfileSnapshot(b"s2", 0, None, None)

    store.profiles.put_profiles([("c1", one), ("c2", two)], now=NOW)
    assert store.profiles.profile("c1") == one
    assert store.profiles.profile("c2") == two

    store.profiles.put_profiles([("c1", two)], now=NOW)
    assert store.profiles.profile("c1") == two
    with database.session(read_only=True) as session:
        versions = dict(session.execute(select(SqlRiskProfile.customer_id, SqlRiskProfile.version)).all())
    assert versions == {"c1": 1, "c2": 0}  # a replaced profile moves on, so a scorer that read it starts over
    with pytest.raises(NotFound):
        store.profiles.put_profiles([("ghost", one)], now=NOW)


def test_profile_summary_counts_the_customers_transactions(store: RiskStores) -> None:
    assert store.profiles.profile_summary("c1").transaction_count == 0
    store.history.import_transactions([_tx(f"h-{i}", minutes=i, amount=100 * (i + 1)) for i in range(5)])
    _score(store, _tx("tx-1", minutes=60, amount=50), evaluate=_counting(Decision.REVIEW))
    _score(
        store, _tx("tx-2", minutes=61), evaluate=_counting(Decision.DECLINE, counts=False, keep_state=True)
    )

    summary = store.profiles.profile_summary("c1")

    assert summary.transaction_count == 6
    assert (summary.first_seen, summary.last_seen) == (T0, T0 + timedelta(minutes=60))
    assert (summary.declines, summary.reviews) == (1, 1)
    assert (summary.distinct_merchants, summary.distinct_terminals) == (3, 2)
    # Amounts 50, 100, 200, 300, 400, 500: the lower median.
    assert (summary.typical_amount_minor, summary.typical_currency) == (200, "CNY")


# -- model registry ------------------------------------------------------------------------------------


def _model(scope: ModelScope, customer_id: str, version: str) -> NewModel:
    return NewModel(
        scope=scope,
        customer_id=customer_id,
        version=version,
        created_at=NOW,
        training_window_start=T0,
        training_window_end=NOW,
        sample_count=120,
        metrics={"roc_auc": 0.91},
        artifact=f"artifact {version}".encode(),
    )


def test_activation_rollback_and_generation(store: RiskStores) -> None:
    g = ModelScope.GLOBAL
    store.registry.add_models([_model(g, "", v) for v in ("g1", "g2", "g3")])
    assert store.registry.generation() == 0
    assert store.registry.active_model(g, "") is None

    first = store.registry.activate(g, "", "g1", now=NOW)
    assert (first.model.version, first.previous_version, first.changed) == ("g1", "", True)
    assert first.model.status is ModelStatus.ACTIVE
    assert first.model.activated_at == NOW
    assert store.registry.generation() == 1

    assert not store.registry.activate(g, "", "g1", now=NOW).changed
    assert store.registry.generation() == 1

    second = store.registry.activate(g, "", "g2", now=NOW + timedelta(hours=1))
    assert second.previous_version == "g1"
    third = store.registry.activate(g, "", "g3", now=NOW + timedelta(hours=2))
    assert third.previous_version == "g2"
    assert store.registry.generation() == 3
    active = store.registry.active_model(g, "")
    assert active is not None
    assert (active.version, active.artifact, active.metrics) == ("g3", b"artifact g3", {"roc_auc": 0.91})

    back = store.registry.rollback(g, "", now=NOW + timedelta(hours=3))
    assert back.model is not None
    assert (back.model.version, back.rolled_back_version) == ("g2", "g3")
    assert store.registry.generation() == 4
    # Rolling back again walks further back, never to the version just rolled back.
    assert store.registry.rollback(g, "", now=NOW + timedelta(hours=4)).model.version == "g1"  # type: ignore[union-attr]
    with pytest.raises(FailedPrecondition) as caught:
        store.registry.rollback(g, "", now=NOW)
    assert caught.value.reason == "NO_PREVIOUS_MODEL"
    with pytest.raises(FailedPrecondition) as caught:
        store.registry.activate(g, "", "g3", now=NOW)
    assert caught.value.reason == "MODEL_RETIRED"
    statuses = {m.version: m.status for m in store.registry.list_models(limit=10)[0]}
    assert statuses == {"g1": ModelStatus.ACTIVE, "g2": ModelStatus.RETIRED, "g3": ModelStatus.RETIRED}


def test_registry_errors(store: RiskStores) -> None:
    store.registry.add_models([_model(ModelScope.GLOBAL, "", "v1"), _model(ModelScope.CUSTOMER, "c1", "v1")])

    with pytest.raises(AlreadyExists):
        store.registry.add_models([_model(ModelScope.GLOBAL, "", "v1")])
    with pytest.raises(AlreadyExists):
        store.registry.add_models(
            [_model(ModelScope.CUSTOMER, "c1", "v2"), _model(ModelScope.CUSTOMER, "c1", "v2")]
        )
    store.registry.add_models(
        [_model(ModelScope.CUSTOMER, "c2", "v1")]
    )  # the same version for another customer
    with pytest.raises(NotFound):
        store.registry.add_models([_model(ModelScope.CUSTOMER, "ghost", "v1")])
    with pytest.raises(InvalidArgument):
        store.registry.add_models([_model(ModelScope.GLOBAL, "c1", "v9")])
    with pytest.raises(InvalidArgument):
        store.registry.add_models([_model(ModelScope.CUSTOMER, "", "v9")])
    with pytest.raises(InvalidArgument):
        store.registry.activate(ModelScope.NONE, "", "v1", now=NOW)
    with pytest.raises(NotFound):
        store.registry.activate(ModelScope.CUSTOMER, "c1", "nope", now=NOW)
    with pytest.raises(FailedPrecondition) as caught:
        store.registry.rollback(ModelScope.CUSTOMER, "c1", now=NOW)
    assert caught.value.reason == "NO_ACTIVE_MODEL"
    assert store.registry.generation() == 0


def test_a_training_run_larger_than_a_chunk_registers_and_activates(
    store: RiskStores, database: Database
) -> None:
    """A run's models share one version: more of them than one insert chunk must not look taken."""
    customers = [f"k{i:04d}" for i in range(1200)]
    _add_customers(database, *customers)
    models = [_model(ModelScope.GLOBAL, "", "run-1")] + [
        _model(ModelScope.CUSTOMER, c, "run-1") for c in customers
    ]

    store.registry.add_models(models)
    store.registry.activate_many([(m.scope, m.customer_id, m.version) for m in models], now=NOW)

    assert len(store.registry.active_models(ModelScope.CUSTOMER)) == 1200
    with pytest.raises(AlreadyExists):
        store.registry.add_models(models[-1:])


def test_activate_many_is_one_change(store: RiskStores) -> None:
    store.registry.add_models(
        [_model(ModelScope.CUSTOMER, c, v) for c in ("c1", "c2", "c3") for v in ("v1", "v2")]
        + [_model(ModelScope.GLOBAL, "", "v1")]
    )
    store.registry.activate(ModelScope.CUSTOMER, "c1", "v1", now=NOW)

    results = store.registry.activate_many(
        [
            (ModelScope.CUSTOMER, "c1", "v2"),
            (ModelScope.CUSTOMER, "c2", "v2"),
            (ModelScope.CUSTOMER, "c3", "v1"),
            (ModelScope.GLOBAL, "", "v1"),
        ],
        now=NOW,
    )

    assert {(r.model.customer_id, r.model.version, r.previous_version) for r in results} == {
        ("c1", "v2", "v1"),
        ("c2", "v2", ""),
        ("c3", "v1", ""),
        ("", "v1", ""),
    }
    assert store.registry.generation() == 2
    active = store.registry.active_models()
    assert sorted((m.scope.value, m.customer_id, m.version) for m in active) == [
        ("CUSTOMER", "c1", "v2"),
        ("CUSTOMER", "c2", "v2"),
        ("CUSTOMER", "c3", "v1"),
        ("GLOBAL", "", "v1"),
    ]
    assert all(m.artifact is not None for m in active)
    assert [m.version for m in store.registry.active_models(ModelScope.GLOBAL)] == ["v1"]
    # All or nothing: one unknown version refuses the whole call.
    with pytest.raises(NotFound):
        store.registry.activate_many(
            [(ModelScope.CUSTOMER, "c3", "v2"), (ModelScope.CUSTOMER, "c2", "v9")], now=NOW
        )
    assert store.registry.active_model(ModelScope.CUSTOMER, "c3").version == "v1"  # type: ignore[union-attr]
    assert store.registry.generation() == 2


def test_list_models_pages_newest_first_without_artifacts(store: RiskStores) -> None:
    store.registry.add_models([_model(ModelScope.CUSTOMER, "c1", f"v{i}") for i in range(5)])
    store.registry.add_models([_model(ModelScope.GLOBAL, "", "g")])
    store.registry.activate(ModelScope.CUSTOMER, "c1", "v3", now=NOW)

    pages: list[list[str]] = []
    after: int | None = None
    while True:
        page, after = store.registry.list_models(
            scope=ModelScope.CUSTOMER, customer_id="c1", limit=2, after_id=after
        )
        pages.append([m.version for m in page])
        assert all(m.artifact is None for m in page)
        if after is None:
            break

    assert pages == [["v4", "v3"], ["v2", "v1"], ["v0"]]
    active, _ = store.registry.list_models(active_only=True, limit=10)
    assert [(m.version, m.active) for m in active] == [("v3", True)]
    assert [m.version for m in store.registry.list_models(scope=ModelScope.GLOBAL, limit=10)[0]] == ["g"]
    model = store.registry.get_model(ModelScope.CUSTOMER, "c1", "v1")
    assert model is not None
    assert model.artifact == b"artifact v1"


def test_the_database_allows_one_active_model_per_scope(store: RiskStores, database: Database) -> None:
    store.registry.add_models([_model(ModelScope.GLOBAL, "", v) for v in ("g1", "g2")])
    store.registry.add_models([_model(ModelScope.CUSTOMER, "c1", v) for v in ("v1", "v2")])
    store.registry.activate(ModelScope.GLOBAL, "", "g1", now=NOW)
    store.registry.activate(ModelScope.CUSTOMER, "c1", "v1", now=NOW)

    for version in ("g2", "v2"):
        with pytest.raises(AlreadyExists), database.session() as session:
            session.execute(
                update(SqlRiskModel).where(SqlRiskModel.version == version).values(status="ACTIVE")
            )
    # NULL customer ids do not collide in a unique index; the partial index on GLOBAL versions does.
    with pytest.raises(AlreadyExists), database.session() as session:
        session.execute(
            insert(SqlRiskModel).values(
                scope="GLOBAL",
                customer_id=None,
                version="g1",
                status="CANDIDATE",
                created_at=NOW,
                training_window_start=T0,
                training_window_end=NOW,
                sample_count=1,
                metrics="{}",
                artifact=b"",
            )
        )


def test_concurrent_activations_leave_one_active(store: RiskStores) -> None:
    versions = [f"v{i}" for i in range(4)]
    store.registry.add_models([_model(ModelScope.GLOBAL, "", v) for v in versions])

    def run(worker: int) -> None:
        store.registry.activate(ModelScope.GLOBAL, "", versions[worker], now=NOW)

    assert _together(len(versions), run) == []
    statuses = sorted(m.status.value for m in store.registry.list_models(limit=10)[0])
    assert statuses == ["ACTIVE"] + ["RETIRED"] * 3
    assert store.registry.generation() == 4


def test_promotions_are_audited_with_the_change(store: RiskStores, database: Database) -> None:
    store.registry.add_models([_model(ModelScope.CUSTOMER, "c1", v) for v in ("v1", "v2")])
    store.registry.activate(ModelScope.CUSTOMER, "c1", "v1", now=NOW, actor="trainer-1", reason="nightly")
    store.registry.activate(ModelScope.CUSTOMER, "c1", "v2", now=NOW, actor="trainer-1", reason="nightly")
    store.registry.rollback(ModelScope.CUSTOMER, "c1", now=NOW, actor="admin-1", reason="alert rate doubled")

    events, _ = SqlAuditStore(database).list(limit=10)
    assert [(e.action, e.actor, e.subject) for e in events] == [
        ("model.promoted", "trainer-1", "v1"),
        ("model.promoted", "trainer-1", "v2"),
        # A rollback is about the version rolled back; the one active again is among the details.
        ("model.rolled_back", "admin-1", "v2"),
    ]
    assert events[1].details == {
        "scope": "CUSTOMER",
        "customer_id": "c1",
        "previous_version": "v1",
        "reason": "nightly",
    }
    assert SqlAuditStore(database).verify().intact
