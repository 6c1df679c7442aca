"""Shadow scoring on SQLite and PostgreSQL: the registry's shadow run, the stored scores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import select

from posguard_server.domain.errors import FailedPrecondition, InvalidArgument, NotFound
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
)
from posguard_server.store.audit import SqlAuditStore
from posguard_server.store.customers import SqlCustomer
from posguard_server.store.db import Database
from posguard_server.store.risk_tables import SqlRiskTransaction
from posguard_server.store.scoring_writes import PlaceActivity, ScoreItem, evaluated

if TYPE_CHECKING:
    from ..conftest import RiskStores

T0 = datetime(2025, 3, 1, 8, 0, 0, tzinfo=UTC)
NOW = datetime(2025, 3, 2, 9, 30, 0, tzinfo=UTC)
G, C = ModelScope.GLOBAL, ModelScope.CUSTOMER


@pytest.fixture
def store(database: Database, risk_stores: RiskStores) -> RiskStores:
    with database.session() as session:
        for customer_id in ("c1", "c2", "c3"):
            session.add(
                SqlCustomer(
                    customer_id=customer_id, issuer="test", created_at=T0, updated_at=T0, created_by="test"
                )
            )
    return risk_stores


def _model(scope: ModelScope, customer_id: str, version: str) -> NewModel:
    return NewModel(
        scope=scope,
        customer_id=customer_id,
        version=version,
        created_at=NOW,
        training_window_start=T0,
        training_window_end=NOW,
        sample_count=120,
        metrics={},
        artifact=f"artifact {version} {customer_id}".encode(),
    )


def _runs(store: RiskStores) -> None:
    """v1: the active run (global, c1, c2); v2: a full run (global, c1); v3: an incremental run (c2 only)."""
    store.registry.add_models([_model(G, "", "v1"), _model(C, "c1", "v1"), _model(C, "c2", "v1")])
    store.registry.add_models([_model(G, "", "v2"), _model(C, "c1", "v2")])
    store.registry.add_models([_model(C, "c2", "v3")])
    store.registry.activate_many([(G, "", "v1"), (C, "c1", "v1"), (C, "c2", "v1")], now=NOW)


def _statuses(store: RiskStores) -> dict[tuple[str, str], ModelStatus]:
    return {(m.version, m.customer_id): m.status for m in store.registry.list_models(limit=100)[0]}


def _tx(transaction_id: str, customer_id: str = "c1", *, minutes: int = 0) -> NewTransaction:
    return NewTransaction(
        transaction_id=transaction_id,
        customer_id=customer_id,
        event_time=T0 + timedelta(minutes=minutes),
        amount_minor=1250,
        currency="CNY",
        merchant_id="m1",
        terminal_id="t1",
        mcc="5411",
        channel=Channel.POS,
    )


def _scorer(risk_score: float, shadow_version: str = "", shadow_risk_score: float | None = None) -> object:
    def evaluate(
        snapshot: ProfileSnapshot | None,
        place: PlaceActivity | None,
        /,
        *,
        shadow_place: PlaceActivity | None = None,
    ) -> Evaluation:
        return Evaluation(
            risk_score=risk_score,
            decision=Decision.APPROVE,
            reasons=(),
            model_scope=ModelScope.GLOBAL,
            model_version="v1",
            history_size=0,
            cold_start=True,
            features=None,
            new_state=b"state",
            shadow_version=shadow_version,
            shadow_risk_score=shadow_risk_score,
        )

    return evaluate


# -- the registry's shadow run -------------------------------------------------------------------------


def test_set_shadow_puts_one_run_in_shadow_and_moves_the_previous_one_out(store: RiskStores) -> None:
    _runs(store)
    assert store.registry.generation() == 1
    assert store.shadow.shadow_version() is None
    assert store.shadow.shadow_model(G, "") is None

    assert store.shadow.set_shadow("v2", now=NOW, actor=None) == 2

    assert store.registry.generation() == 2
    assert store.shadow.shadow_version() == "v2"
    shadow_global = store.shadow.shadow_model(G, "")
    assert shadow_global is not None
    assert (shadow_global.version, shadow_global.status) == ("v2", ModelStatus.SHADOW)
    assert shadow_global.artifact == b"artifact v2 "
    shadow_c1 = store.shadow.shadow_model(C, "c1")
    assert shadow_c1 is not None
    assert (shadow_c1.version, shadow_c1.artifact) == ("v2", b"artifact v2 c1")
    assert store.shadow.shadow_model(C, "c2") is None
    # The active models are untouched: shadow never changes what answers.
    assert [m.version for m in store.registry.active_models()] == ["v1", "v1", "v1"]

    # One shadow run at a time: shadowing v3 sends v2 back to the candidates.
    assert store.shadow.set_shadow("v3", now=NOW, actor=None) == 1
    assert store.registry.generation() == 3
    assert store.shadow.shadow_version() == "v3"
    assert store.shadow.shadow_model(G, "") is None
    assert store.shadow.shadow_model(C, "c1") is None
    shadow_c2 = store.shadow.shadow_model(C, "c2")
    assert shadow_c2 is not None
    assert shadow_c2.version == "v3"
    assert _statuses(store) == {
        ("v1", ""): ModelStatus.ACTIVE,
        ("v1", "c1"): ModelStatus.ACTIVE,
        ("v1", "c2"): ModelStatus.ACTIVE,
        ("v2", ""): ModelStatus.CANDIDATE,
        ("v2", "c1"): ModelStatus.CANDIDATE,
        ("v3", "c2"): ModelStatus.SHADOW,
    }


def test_set_shadow_refuses_unknown_versions_and_runs_without_candidates(store: RiskStores) -> None:
    _runs(store)

    with pytest.raises(NotFound) as not_found:
        store.shadow.set_shadow("v9", now=NOW, actor="admin")
    assert (not_found.value.reason, not_found.value.metadata) == ("MODEL_NOT_FOUND", {"version": "v9"})
    with pytest.raises(FailedPrecondition) as active:
        store.shadow.set_shadow("v1", now=NOW, actor="admin")
    assert (active.value.reason, active.value.metadata) == ("MODEL_NOT_CANDIDATE", {"version": "v1"})
    assert store.registry.generation() == 1

    store.shadow.set_shadow("v2", now=NOW, actor=None)
    # Already in shadow: nothing of it is a candidate any more.
    with pytest.raises(FailedPrecondition) as again:
        store.shadow.set_shadow("v2", now=NOW, actor=None)
    assert again.value.reason == "MODEL_NOT_CANDIDATE"
    assert store.registry.generation() == 2
    assert store.shadow.shadow_version() == "v2"
    with pytest.raises(InvalidArgument):
        store.shadow.shadow_model(ModelScope.NONE, "")
    with pytest.raises(InvalidArgument):
        store.shadow.shadow_model(C, "")


def test_set_shadow_takes_only_the_candidates_of_a_partly_promoted_run(store: RiskStores) -> None:
    _runs(store)
    store.registry.activate(G, "", "v2", now=NOW)

    assert store.shadow.set_shadow("v2", now=NOW, actor=None) == 1

    statuses = _statuses(store)
    assert (statuses[("v2", "")], statuses[("v2", "c1")]) == (ModelStatus.ACTIVE, ModelStatus.SHADOW)
    assert store.shadow.shadow_model(G, "") is None
    # A shadow model is promoted like a candidate, and is then no longer in shadow.
    store.registry.activate(C, "c1", "v2", now=NOW)
    assert store.shadow.shadow_version() is None


def test_clear_shadow_returns_the_run_to_the_candidates(store: RiskStores) -> None:
    _runs(store)
    assert store.shadow.clear_shadow(now=NOW, actor=None) == 0
    assert store.registry.generation() == 1  # nothing was in shadow: no reload

    store.shadow.set_shadow("v2", now=NOW, actor=None)
    assert store.shadow.clear_shadow(now=NOW, actor=None) == 2

    assert store.registry.generation() == 3
    assert store.shadow.shadow_version() is None
    assert store.shadow.shadow_model(G, "") is None
    assert _statuses(store)[("v2", "")] is ModelStatus.CANDIDATE
    assert _statuses(store)[("v2", "c1")] is ModelStatus.CANDIDATE
    assert store.shadow.clear_shadow(now=NOW, actor=None) == 0
    assert store.registry.generation() == 3
    # Cleared runs are candidates again, so they can go back into shadow.
    assert store.shadow.set_shadow("v2", now=NOW, actor=None) == 2


def test_shadow_changes_are_audited_with_the_change(store: RiskStores, database: Database) -> None:
    _runs(store)
    store.shadow.set_shadow("v2", now=NOW, actor="trainer-1", reason="nightly")
    store.shadow.set_shadow("v3", now=NOW, actor="trainer-1")
    store.shadow.clear_shadow(now=NOW, actor="admin-1", reason="enough traffic seen")
    store.shadow.clear_shadow(now=NOW, actor="admin-1")  # nothing in shadow: not an event
    store.shadow.set_shadow("v2", now=NOW, actor=None)  # no actor: not audited

    audit = SqlAuditStore(database)
    events, _ = audit.list(limit=10)
    assert [(e.action, e.actor, e.subject, e.details) for e in events] == [
        ("model.shadowed", "trainer-1", "v2", {"models": "2", "previous_version": "", "reason": "nightly"}),
        ("model.shadowed", "trainer-1", "v3", {"models": "1", "previous_version": "v2"}),
        ("model.shadow_cleared", "admin-1", "v3", {"models": "1", "reason": "enough traffic seen"}),
    ]
    assert audit.verify().intact


# -- stored shadow scores ------------------------------------------------------------------------------


def test_shadow_scores_are_stored_next_to_the_answer_and_paired_for_reports(
    store: RiskStores, database: Database
) -> None:
    scored = [
        ("tx-1", "c1", _scorer(0.10, "v2", 0.30)),
        ("tx-2", "c2", _scorer(0.20)),  # no shadow run
        ("tx-3", "c1", _scorer(0.40, "v3", 0.50)),  # another run
        ("tx-4", "c2", _scorer(0.60, "v2", 0.0)),  # a score of 0 is a score
        ("tx-5", "c3", _scorer(0.70, "v2", None)),  # a version without a score is not a comparison
        ("tx-6", "c3", _scorer(0.80, "v2", 0.95)),
    ]
    results = store.scoring.score_many(
        [
            ScoreItem(_tx(tid, customer, minutes=i), "f" * 64, "", evaluate)  # type: ignore[arg-type]
            for i, (tid, customer, evaluate) in enumerate(scored)
        ],
        now=NOW,
        finish=evaluated,
    )
    assert all(isinstance(result, tuple) for result in results)
    store.history.import_transactions([_tx("h-1", "c1", minutes=-5)])
    store.outcomes.bulk_outcomes([("tx-1", Outcome.FRAUD, NOW), ("tx-4", Outcome.LEGITIMATE, NOW)])
    store.outcomes.bulk_outcomes([("tx-6", Outcome.CHARGEBACK, NOW), ("h-1", Outcome.FRAUD, NOW)])

    pairs = store.shadow.shadow_pairs("v2")

    assert len(pairs) == 3
    assert pairs.transaction_ids == ("tx-1", "tx-4", "tx-6")
    assert pairs.active_scores == (0.10, 0.60, 0.80)
    assert pairs.shadow_scores == (0.30, 0.0, 0.95)
    assert pairs.fraud == (True, False, True)
    assert store.shadow.shadow_pairs("v3").transaction_ids == ("tx-3",)
    assert len(store.shadow.shadow_pairs("v9")) == 0
    with database.session(read_only=True) as session:
        rows = {
            tid: (version, score)
            for tid, version, score in session.execute(
                select(
                    SqlRiskTransaction.transaction_id,
                    SqlRiskTransaction.shadow_version,
                    SqlRiskTransaction.shadow_risk_score,
                )
            )
        }
    assert rows["tx-2"] == (None, None)
    assert rows["tx-5"] == (None, None)
    assert rows["h-1"] == (None, None)
    # A retry replays the stored answer and stores nothing twice.
    again = store.scoring.score_many(
        [ScoreItem(_tx("tx-1", "c1"), "f" * 64, "", _scorer(0.99))], now=NOW, finish=evaluated
    )  # type: ignore[arg-type]
    assert again[0][1] is True  # type: ignore[index]
    assert store.shadow.shadow_pairs("v2").transaction_ids == ("tx-1", "tx-4", "tx-6")


def test_a_shadow_feedback_window_reads_the_place_over_its_own_window(store: RiskStores) -> None:
    # Fraud was reported for c2 at terminal t1 three days ago and for c3 ten days ago.
    store.history.import_transactions(
        [
            _tx("h-c2", "c2", minutes=-3 * 24 * 60),
            _tx("h-c3", "c3", minutes=-10 * 24 * 60),
        ]
    )
    store.outcomes.bulk_outcomes([("h-c2", Outcome.FRAUD, T0 - timedelta(days=1))])
    store.outcomes.bulk_outcomes([("h-c3", Outcome.FRAUD, T0 - timedelta(days=1))])
    calls: list[tuple[PlaceActivity | None, str, PlaceActivity | None]] = []

    def recording(
        snapshot: ProfileSnapshot | None,
        place: PlaceActivity | None,
        /,
        *,
        shadow_place: PlaceActivity | None = None,
        **unexpected: object,
    ) -> Evaluation:
        assert not unexpected
        calls.append((place, "shadow_place" if shadow_place is not None else "-", shadow_place))
        return _scorer(0.5)(snapshot, place)  # type: ignore[operator]

    def legacy(snapshot: ProfileSnapshot | None, place: PlaceActivity | None) -> Evaluation:
        """A scorer that knows nothing of shadow runs is called as before."""
        calls.append((place, "legacy", None))
        return _scorer(0.5)(snapshot, place)  # type: ignore[operator]

    week, month = T0 - timedelta(days=7), T0 - timedelta(days=28)
    store.scoring.score_many(
        [
            ScoreItem(_tx("tx-1", "c1"), "f" * 64, "", recording, week, month),
            ScoreItem(_tx("tx-2", "c1", minutes=1), "f" * 64, "", recording, None, week),
            ScoreItem(_tx("tx-3", "c1", minutes=2), "f" * 64, "", legacy, month),
        ],
        now=NOW,
        finish=evaluated,
    )

    assert calls == [
        ((1, 1), "shadow_place", (2, 2)),
        (None, "shadow_place", (1, 2)),  # tx-1 counts now: stored earlier in the batch
        ((2, 3), "legacy", None),
    ]
