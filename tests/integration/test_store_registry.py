"""The model registry's run promotion and rollback, on SQLite and PostgreSQL.

A training run is one version shared by its GLOBAL model (when it trained one) and its CUSTOMER models:
promoting or rolling back the GLOBAL scope moves the whole run, in one transaction.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from posguard_server.domain.errors import FailedPrecondition, InvalidArgument, NotFound
from posguard_server.domain.risk import (
    METRIC_AP,
    METRIC_BASELINE_AP,
    METRIC_EVALUATED_AT,
    ModelScope,
    ModelStatus,
    NewModel,
    Promotion,
)
from posguard_server.store import model_registry
from posguard_server.store.audit import SqlAuditStore
from posguard_server.store.customers import SqlCustomer
from posguard_server.store.db import Database
from posguard_server.store.model_registry import SqlModelRegistry
from posguard_server.store.risk_tables import SqlRiskModel

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
NOW = datetime(2025, 3, 2, 9, 30, tzinfo=UTC)
AFTER_NOW, BEFORE_NOW = NOW.timestamp() + 60, NOW.timestamp() - 60
G, C = ModelScope.GLOBAL, ModelScope.CUSTOMER


@pytest.fixture
def store(database: Database) -> SqlModelRegistry:
    _add_customers(database, "c1", "c2", "c3")
    return SqlModelRegistry(database)


def _add_customers(database: Database, *customer_ids: str) -> None:
    with database.session() as session:
        for customer_id in customer_ids:
            session.add(
                SqlCustomer(
                    customer_id=customer_id, issuer="test", created_at=T0, updated_at=T0, created_by="t"
                )
            )


def _evaluated(store: SqlModelRegistry, ap: float, baseline: float) -> dict[str, float]:
    """Run-level metrics of an evaluation against the models serving now."""
    return {
        METRIC_AP: ap,
        METRIC_BASELINE_AP: baseline,
        # After every activation these tests make (at NOW, or an hour later).
        METRIC_EVALUATED_AT: (NOW + timedelta(hours=2)).timestamp(),
    }


def _register(
    store: SqlModelRegistry,
    version: str,
    customers: tuple[str, ...],
    *,
    with_global: bool = True,
    metrics: Mapping[str, float] | None = None,
) -> None:
    """A training run: its GLOBAL model (if any) and one model per customer, all with the run's metrics."""
    scopes = ([(G, "")] if with_global else []) + [(C, c) for c in customers]
    store.add_models(
        [
            NewModel(
                scope=scope,
                customer_id=customer,
                version=version,
                created_at=NOW,
                training_window_start=T0,
                training_window_end=NOW,
                sample_count=100,
                metrics=dict(metrics or {}),
                artifact=f"{version} {customer}".encode(),
            )
            for scope, customer in scopes
        ]
    )


def _promote(
    store: SqlModelRegistry,
    version: str,
    *,
    force: bool = False,
    request_id: str | None = None,
    fingerprint: str = "",
) -> Promotion:
    return store.promote(
        G,
        "",
        version,
        force=force,
        now=NOW,
        actor="trainer",
        reason="test",
        request_id=request_id,
        fingerprint=fingerprint,
    )


def _active(store: SqlModelRegistry) -> dict[str, str]:
    """The active version of each slot: "" for GLOBAL, else the customer id."""
    return {m.customer_id: m.version for m in store.active_models()}


def _statuses(store: SqlModelRegistry, version: str) -> dict[str, ModelStatus]:
    models, _ = store.list_models(limit=1000)
    return {m.customer_id: m.status for m in models if m.version == version}


def _events(database: Database) -> list[tuple[str, str, dict[str, str]]]:
    events, _ = SqlAuditStore(database).list(limit=100)
    return [(e.action, e.subject, dict(e.details)) for e in events]


# -- promotion -----------------------------------------------------------------------------------------


def test_promoting_a_run_activates_its_global_and_customer_models_in_one_change(
    store: SqlModelRegistry, database: Database
) -> None:
    _register(store, "r1", ("c1", "c2"))
    first = _promote(store, "r1")  # nothing active: nothing to be worse than, no evaluation needed

    assert first.model is not None
    assert (first.model.scope, first.model.version, first.model.status) == (G, "r1", ModelStatus.ACTIVE)
    assert (first.previous_version, first.customer_models, first.forced, first.overridden) == (
        "",
        2,
        False,
        "",
    )
    assert _active(store) == {"": "r1", "c1": "r1", "c2": "r1"}
    assert store.generation() == 1

    _register(store, "r2", ("c1", "c3"), metrics=_evaluated(store, 0.41, 0.40))
    second = _promote(store, "r2")

    assert (second.previous_version, second.customer_models) == ("r1", 2)
    # c2 was not retrained: it keeps run 1's model, which the run was evaluated with.
    assert _active(store) == {"": "r2", "c1": "r2", "c2": "r1", "c3": "r2"}
    assert _statuses(store, "r1") == {
        "": ModelStatus.RETIRED,
        "c1": ModelStatus.RETIRED,
        "c2": ModelStatus.ACTIVE,
    }
    assert store.generation() == 2
    events = _events(database)
    assert [(action, subject) for action, subject, _ in events] == [
        ("model.promoted", "r1"),
        ("model.promoted", "r2"),
    ]
    assert events[1][2] == {
        "scope": "GLOBAL",
        "previous_version": "r1",
        "customer_models": "2",
        "forced": "false",
        "average_precision": "0.41",
        "baseline_average_precision": "0.4",
        "reason": "test",
    }
    assert SqlAuditStore(database).verify().intact


def test_a_run_in_shadow_is_promoted_like_a_candidate(store: SqlModelRegistry, database: Database) -> None:
    _register(store, "r1", ("c1",))
    with database.session() as session:
        session.execute(update(SqlRiskModel).where(SqlRiskModel.version == "r1").values(status="SHADOW"))

    assert _promote(store, "r1").customer_models == 1
    assert _active(store) == {"": "r1", "c1": "r1"}


def test_a_run_larger_than_a_chunk_is_promoted_whole_or_not_at_all(
    store: SqlModelRegistry, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    customers = tuple(f"k{i:04d}" for i in range(1100))
    _add_customers(database, *customers)
    _register(store, "big", customers)
    real = model_registry._activate_chunk
    calls: list[int] = []

    def failing_third_chunk(*args: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the database went away mid-run")
        return real(*args)

    monkeypatch.setattr(model_registry, "_activate_chunk", failing_third_chunk)
    with pytest.raises(RuntimeError):
        _promote(store, "big")
    assert _active(store) == {}
    assert store.generation() == 0
    assert _events(database) == []

    monkeypatch.setattr(model_registry, "_activate_chunk", real)
    assert _promote(store, "big").customer_models == 1100
    assert len(_active(store)) == 1101
    assert store.generation() == 1


@pytest.mark.parametrize(
    ("metrics", "words"),
    [
        (
            {METRIC_AP: 0.30, METRIC_BASELINE_AP: 0.40, METRIC_EVALUATED_AT: NOW.timestamp() + 60},
            "worse than",
        ),
        # Evaluated before run 1 became active at NOW: against models that no longer serve.
        (
            {METRIC_AP: 0.50, METRIC_BASELINE_AP: 0.40, METRIC_EVALUATED_AT: NOW.timestamp() - 60},
            "changed after",
        ),
        ({}, "no evaluation"),
    ],
    ids=["worse", "stale", "unevaluated"],
)
def test_a_candidate_is_refused_unless_forced(
    store: SqlModelRegistry, database: Database, metrics: dict[str, float], words: str
) -> None:
    _register(store, "r1", ("c1",))
    _promote(store, "r1")
    _register(store, "r2", ("c1", "c2"), metrics=metrics)

    with pytest.raises(FailedPrecondition) as caught:
        _promote(store, "r2")
    assert caught.value.reason == "CANDIDATE_NOT_BETTER"
    assert words in caught.value.message
    assert _active(store) == {"": "r1", "c1": "r1"}
    assert set(_statuses(store, "r2").values()) == {ModelStatus.CANDIDATE}
    assert store.generation() == 1
    assert len(_events(database)) == 1

    forced = _promote(store, "r2", force=True)
    assert (forced.forced, forced.previous_version, forced.customer_models) == (True, "r1", 2)
    assert words in forced.overridden
    assert _active(store) == {"": "r2", "c1": "r2", "c2": "r2"}
    details = _events(database)[-1][2]
    assert details["forced"] == "true"
    assert words in details["overridden"]


def test_a_candidate_as_good_as_the_active_run_is_promoted(store: SqlModelRegistry) -> None:
    _register(store, "r1", ("c1",))
    _promote(store, "r1")
    _register(store, "r2", ("c1",), metrics=_evaluated(store, 0.40, 0.40))

    assert not _promote(store, "r2").overridden
    assert _active(store) == {"": "r2", "c1": "r2"}


def test_promotion_errors_change_nothing(store: SqlModelRegistry) -> None:
    _register(store, "r1", ("c1",))
    _register(store, "r2", ("c1",))
    with pytest.raises(NotFound):
        _promote(store, "nope")
    with pytest.raises(NotFound):
        store.promote(C, "c2", "r1", force=False, now=NOW, actor="t", reason="x")  # c2 has no model in r1
    with pytest.raises(InvalidArgument):
        store.promote(ModelScope.NONE, "", "r1", force=False, now=NOW, actor="t", reason="x")
    _promote(store, "r1")
    with pytest.raises(FailedPrecondition) as caught:
        _promote(store, "r1")
    assert caught.value.reason == "MODEL_ALREADY_ACTIVE"
    _promote(store, "r2", force=True)
    store.rollback(G, "", now=NOW, actor="t", reason="x")
    with pytest.raises(FailedPrecondition) as caught:
        _promote(store, "r2", force=True)
    assert caught.value.reason == "MODEL_RETIRED"
    assert store.generation() == 3
    assert _active(store) == {"": "r1", "c1": "r1"}


def test_customer_scope_promotes_one_customer_judged_on_its_own_slot(store: SqlModelRegistry) -> None:
    _register(store, "r1", ("c1",))
    _promote(store, "r1")
    _register(store, "r2", ("c1", "c2"))  # no evaluation

    # c2 has no active model of its own: nothing to be worse than.
    result = store.promote(C, "c2", "r2", force=False, now=NOW, actor="t", reason="x")
    assert result.model is not None
    assert (result.model.customer_id, result.previous_version, result.customer_models) == ("c2", "", 1)
    with pytest.raises(FailedPrecondition) as caught:
        store.promote(C, "c1", "r2", force=False, now=NOW, actor="t", reason="x")
    assert caught.value.reason == "CANDIDATE_NOT_BETTER"
    assert _active(store) == {"": "r1", "c1": "r1", "c2": "r2"}
    # The rest of the run can still be promoted: what is already active stays.
    assert _promote(store, "r2", force=True).customer_models == 1
    assert _active(store) == {"": "r2", "c1": "r2", "c2": "r2"}


def test_a_customer_only_run_is_judged_on_its_customers_slots(store: SqlModelRegistry) -> None:
    _register(store, "r1", ("c1",))
    _promote(store, "r1")
    _register(store, "new", ("c3",), with_global=False)  # only customers without a model of their own
    _register(store, "inc", ("c1", "c2"), with_global=False)  # retrains c1, which has one

    fresh = _promote(store, "new")
    assert (fresh.model, fresh.previous_version, fresh.customer_models) == (None, "", 1)
    with pytest.raises(FailedPrecondition) as caught:
        _promote(store, "inc")
    assert "no evaluation" in caught.value.message
    _register(store, "inc2", ("c1", "c2"), with_global=False, metrics=_evaluated(store, 0.5, 0.4))
    assert _promote(store, "inc2").customer_models == 2
    assert _active(store) == {"": "r1", "c1": "inc2", "c2": "inc2", "c3": "new"}


# -- rollback ------------------------------------------------------------------------------------------


def test_rolling_back_the_global_scope_restores_the_previous_run(
    store: SqlModelRegistry, database: Database
) -> None:
    _register(store, "r1", ("c1", "c2"))
    _promote(store, "r1")
    _register(store, "r2", ("c1", "c3"))
    _promote(store, "r2", force=True)
    assert _active(store) == {"": "r2", "c1": "r2", "c2": "r1", "c3": "r2"}

    back = store.rollback(G, "", now=NOW + timedelta(hours=1), actor="admin", reason="alert rate doubled")

    assert back.model is not None
    assert (back.rolled_back_version, back.model.version, back.model.status) == (
        "r2",
        "r1",
        ModelStatus.ACTIVE,
    )
    assert back.model.activated_at == NOW + timedelta(hours=1)
    assert (back.customer_models_restored, back.customer_models_retired) == (1, 1)
    # c3 had no model before run 2: it is scored by the global model alone again.
    assert _active(store) == {"": "r1", "c1": "r1", "c2": "r1"}
    assert set(_statuses(store, "r2").values()) == {ModelStatus.RETIRED}
    assert store.generation() == 3
    action, subject, details = _events(database)[-1]
    assert (action, subject) == ("model.rolled_back", "r2")
    assert details == {
        "scope": "GLOBAL",
        "version": "r2",
        "restored_version": "r1",
        "customer_models_restored": "1",
        "customer_models_retired": "1",
        "reason": "alert rate doubled",
    }
    assert len(_events(database)) == 3

    # Run 1's global model replaced none: rolling it back would leave no global model.
    with pytest.raises(FailedPrecondition) as caught:
        store.rollback(G, "", now=NOW, actor="admin", reason="again")
    assert caught.value.reason == "NO_PREVIOUS_MODEL"
    assert _active(store) == {"": "r1", "c1": "r1", "c2": "r1"}
    assert store.generation() == 3


def test_rollback_by_version_undoes_a_customer_only_run(store: SqlModelRegistry, database: Database) -> None:
    _register(store, "r1", ("c1",))
    _promote(store, "r1")
    _register(store, "inc", ("c1", "c2"), with_global=False)
    _promote(store, "inc", force=True)

    back = store.rollback(G, "", version="inc", now=NOW, actor="admin", reason="bad run")

    assert (back.rolled_back_version, back.model) == ("inc", None)
    assert (back.customer_models_restored, back.customer_models_retired) == (1, 1)
    assert _active(store) == {"": "r1", "c1": "r1"}
    assert _events(database)[-1][2]["restored_version"] == ""
    with pytest.raises(FailedPrecondition) as caught:
        store.rollback(G, "", version="inc", now=NOW)
    assert caught.value.reason == "MODEL_NOT_ACTIVE"
    with pytest.raises(NotFound):
        store.rollback(G, "", version="nope", now=NOW)
    with pytest.raises(InvalidArgument):
        store.rollback(C, "c1", version="r1", now=NOW)
    assert store.generation() == 3


def test_customer_scope_rollback_moves_one_customer(store: SqlModelRegistry) -> None:
    _register(store, "r1", ("c1", "c2"))
    _promote(store, "r1")
    _register(store, "r2", ("c1", "c2"))
    _promote(store, "r2", force=True)

    back = store.rollback(C, "c1", now=NOW, actor="admin", reason="one customer")
    assert back.model is not None
    assert (back.rolled_back_version, back.model.customer_id, back.model.version) == ("r2", "c1", "r1")
    assert (back.customer_models_restored, back.customer_models_retired) == (1, 0)
    assert _active(store) == {"": "r2", "c1": "r1", "c2": "r2"}
    with pytest.raises(FailedPrecondition) as caught:
        store.rollback(C, "c3", now=NOW)
    assert caught.value.reason == "NO_ACTIVE_MODEL"


# -- idempotency and concurrency -----------------------------------------------------------------------


def test_a_retry_with_the_same_request_id_answers_the_first_call_and_changes_nothing(
    store: SqlModelRegistry, database: Database
) -> None:
    _register(store, "r1", ("c1",))
    _promote(store, "r1")
    _register(store, "r2", ("c1", "c2"))
    first = _promote(store, "r2", force=True, request_id="p-1", fingerprint="f")
    again = _promote(store, "r2", force=True, request_id="p-1", fingerprint="f")

    assert again == first
    assert store.generation() == 2
    with pytest.raises(InvalidArgument) as caught:
        _promote(store, "r2", request_id="p-1", fingerprint="other")
    assert caught.value.reason == "IDEMPOTENCY_CONFLICT"

    back = store.rollback(G, "", now=NOW, actor="a", reason="x", request_id="b-1", fingerprint="g")
    later = store.rollback(G, "", now=NOW, actor="a", reason="x", request_id="b-1", fingerprint="g")
    assert later == back
    assert (later.rolled_back_version, later.customer_models_retired) == ("r2", 1)
    assert store.generation() == 3
    assert [a for a, _, _ in _events(database)] == ["model.promoted"] * 2 + ["model.rolled_back"]
    assert _events(database)[-1][2]["request_id"] == "b-1"


def _together(work: Callable[[int], object], workers: int = 2) -> list[BaseException]:
    barrier = threading.Barrier(workers)
    errors: list[BaseException] = []

    def run(worker: int) -> None:
        barrier.wait()
        try:
            work(worker)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_two_processes_promoting_and_rolling_back_at_once_leave_whole_runs(
    store: SqlModelRegistry, database: Database, database_url: str
) -> None:
    customers = tuple(f"k{i:03d}" for i in range(600))
    _add_customers(database, *customers)
    for version in ("r1", "r2", "r3"):
        _register(store, version, customers)
    _promote(store, "r1")
    other = Database(database_url)  # another process: its own engine and connections
    try:
        stores = [store, SqlModelRegistry(other)]
        assert _together(lambda w: _promote(stores[w], ("r2", "r3")[w], force=True)) == []
        active = set(_active(store).values())
        assert len(active) == 1  # one whole run, never a mix
        assert active < {"r2", "r3"}
        assert store.generation() == 3

        assert _together(lambda w: stores[w].rollback(G, "", now=NOW, actor="a", reason="x")) == []
        assert set(_active(store).values()) == {"r1"}
        assert store.generation() == 5
    finally:
        other.dispose()
