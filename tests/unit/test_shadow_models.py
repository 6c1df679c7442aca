"""The risk engine's shadow run: which models score in shadow, reloads, and models it cannot load.

The registry is a stand-in holding real model artifacts; the database path is covered by
tests/integration/test_shadow_scoring.py.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest

from posguard_models.features import Event, Profile
from posguard_models.forest import CompiledForest
from posguard_models.training import History, Trained, TrainingConfig, train
from posguard_server.domain.risk import Evaluation, ModelRecord, ModelScope, ModelStatus, artifact_digest
from posguard_server.scoring import (
    IdentityDecline,
    ModelCache,
    RiskEngine,
    ScoreRequest,
    Thresholds,
    TransactionInput,
    Unreadable,
)

G, C = ModelScope.GLOBAL, ModelScope.CUSTOMER
ACTIVE, SHADOW = ModelStatus.ACTIVE, ModelStatus.SHADOW
WHEN = datetime(2025, 3, 1, 12, tzinfo=UTC)
AMOUNT = 480.0


def _run(seed: int) -> Trained:
    """A small run on synthetic history: a global model and models for c1 and c2 (not c3)."""
    rng = np.random.default_rng(seed)
    customers = np.repeat(np.array(["c1", "c2"], dtype=object), 80)
    times = np.concatenate([np.sort(rng.uniform(0, 60 * 86400, 80)) + 1.7e9 for _ in range(2)])
    n = len(times)
    history = History(
        customers=customers,
        times=times,
        amounts=rng.lognormal(3.0, 0.6, n),
        keys=np.array(["t1"] * n, dtype=object),
        fraud=np.zeros(n, dtype=bool),
        label_times=np.full(n, np.nan),
    )
    config = TrainingConfig(seed=seed, n_estimators=20, customer_estimators=10, customer_min_history=30)
    return train(history, config)


@pytest.fixture(scope="module")
def runs() -> dict[str, Trained]:
    return {"run-1": _run(1), "run-2": _run(2), "run-3": _run(3)}


def _record(
    scope: ModelScope, customer: str, version: str, status: ModelStatus, artifact: bytes
) -> ModelRecord:
    return ModelRecord(
        id=0,
        scope=scope,
        customer_id=customer,
        version=version,
        status=status,
        created_at=WHEN,
        training_window_start=WHEN,
        training_window_end=WHEN,
        sample_count=80,
        metrics={},
        activated_at=None,
        artifact=artifact,
        artifact_sha256=artifact_digest(artifact),
    )


class Registry:
    """The registry reads the engine makes, and its writes: ``score_many`` runs each item's scorer."""

    def __init__(self) -> None:
        self.generation_value = 0
        self.models: dict[tuple[ModelStatus, ModelScope, str], ModelRecord] = {}
        self.reads: Counter[str] = Counter()

    def put(
        self, run: Trained, version: str, status: ModelStatus, customers: tuple[str, ...] = ("c1", "c2")
    ) -> None:
        self.models[(status, G, "")] = _record(G, "", version, status, run.global_model.to_bytes())
        for model in run.customer_models:
            if model.customer in customers:
                self.models[(status, C, model.customer)] = _record(
                    C, model.customer, version, status, model.forest.to_bytes()
                )
        self.generation_value += 1

    def clear(self, status: ModelStatus) -> None:
        self.models = {key: record for key, record in self.models.items() if key[0] is not status}
        self.generation_value += 1

    def generation(self) -> int:
        return self.generation_value

    def active_model(self, scope: ModelScope, customer_id: str) -> ModelRecord | None:
        self.reads["active_model"] += 1
        return self.models.get((ACTIVE, scope, customer_id))

    def shadow_version(self) -> str | None:
        self.reads["shadow_version"] += 1
        versions = {r.version for (status, _, _), r in self.models.items() if status is SHADOW}
        return min(versions) if versions else None

    def shadow_model(self, scope: ModelScope, customer_id: str) -> ModelRecord | None:
        self.reads["shadow_model"] += 1
        return self.models.get((SHADOW, scope, customer_id))

    def score_many(self, items: Any, *, now: datetime, finish: Any) -> list[Evaluation]:
        return list(finish([item.evaluate(None, None) for item in items]))


def _engine(registry: Registry) -> RiskEngine:
    return RiskEngine(
        ModelCache(registry, registry, refresh_seconds=0.0),  # type: ignore[arg-type]
        registry,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        thresholds=Thresholds(review=0.99, decline=0.999),
    )


def _request(customer_id: str, identity: IdentityDecline | None = None) -> ScoreRequest:
    txn = TransactionInput(
        transaction_id=f"tx-{customer_id}",
        amount_minor=round(AMOUNT * 100),
        currency="EUR",
        merchant_id="m1",
        terminal_id="t1",
        mcc="",
        event_time=WHEN,
        channel="pos",
        latitude=None,
        longitude=None,
    )
    return ScoreRequest(txn, customer_id, identity, "", "f" * 64)


def _score(engine: RiskEngine, *customers: str) -> dict[str, Evaluation]:
    evaluations = engine.score_many([_request(c) for c in customers])
    return dict(zip(customers, evaluations, strict=True))  # type: ignore[arg-type]


def _expected(run: Trained, customer: Trained | None, customer_id: str) -> float:
    """What ``run``'s global model scores a first transaction with ``customer``'s forest for the customer."""
    x = Profile().features(Event(WHEN.timestamp(), AMOUNT))
    forest = None
    if customer is not None:
        forest = next(m.forest for m in customer.customer_models if m.customer == customer_id)
    return run.global_model.score(x, forest, 80 if forest is not None else 0).risk_score


def test_without_a_shadow_run_nothing_is_scored_in_shadow(runs: dict[str, Trained]) -> None:
    registry = Registry()
    registry.put(runs["run-1"], "run-1", ACTIVE)

    scored = _score(_engine(registry), "c1", "c2", "c3")

    assert {(e.shadow_version, e.shadow_risk_score) for e in scored.values()} == {("", None)}
    assert scored["c1"].risk_score == _expected(runs["run-1"], runs["run-1"], "c1")
    # One look for a shadow run when the generation moved, no shadow model read per customer.
    assert registry.reads["shadow_version"] == 1
    assert registry.reads["shadow_model"] == 0


def test_the_shadow_run_scores_with_its_models_and_the_answer_stays_the_active_one(
    runs: dict[str, Trained],
) -> None:
    registry = Registry()
    registry.put(runs["run-1"], "run-1", ACTIVE)
    engine = _engine(registry)
    plain = _score(engine, "c1", "c2", "c3")
    # run-2 retrained c1 only: c2 keeps its active model in the comparison, c3 has none in either.
    registry.put(runs["run-2"], "run-2", SHADOW, customers=("c1",))

    scored = _score(engine, "c1", "c2", "c3")

    for customer in ("c1", "c2", "c3"):
        answer, before = scored[customer], plain[customer]
        assert (answer.risk_score, answer.decision, answer.reasons) == (
            before.risk_score,
            before.decision,
            before.reasons,
        )
        assert (answer.model_scope, answer.model_version) == (before.model_scope, before.model_version)
        assert answer.shadow_version == "run-2"
    assert scored["c1"].shadow_risk_score == _expected(runs["run-2"], runs["run-2"], "c1")
    assert scored["c2"].shadow_risk_score == _expected(runs["run-2"], runs["run-1"], "c2")
    assert scored["c3"].shadow_risk_score == _expected(runs["run-2"], None, "c3")
    assert scored["c1"].shadow_risk_score != scored["c1"].risk_score

    # Rule declines ask no model, in shadow neither: not even a shadow model is read for them.
    reads = registry.reads["shadow_model"]
    declined = engine.score_many([_request("c9", IdentityDecline("NUMBER_REVOKED", "revoked"))])[0]
    assert (declined.shadow_version, declined.shadow_risk_score) == ("", None)  # type: ignore[union-attr]
    assert registry.reads["shadow_model"] == reads


def test_a_new_shadow_run_replaces_the_cached_one(runs: dict[str, Trained]) -> None:
    registry = Registry()
    registry.put(runs["run-1"], "run-1", ACTIVE)
    registry.put(runs["run-2"], "run-2", SHADOW)
    engine = _engine(registry)
    assert _score(engine, "c1")["c1"].shadow_risk_score == _expected(runs["run-2"], runs["run-2"], "c1")

    registry.clear(SHADOW)
    registry.put(runs["run-3"], "run-3", SHADOW)
    scored = _score(engine, "c1")["c1"]

    assert (scored.shadow_version, scored.shadow_risk_score) == (
        "run-3",
        _expected(runs["run-3"], runs["run-3"], "c1"),
    )
    registry.clear(SHADOW)
    assert _score(engine, "c1")["c1"].shadow_version == ""


def test_a_shadow_run_without_a_global_model_combines_with_the_active_one(runs: dict[str, Trained]) -> None:
    registry = Registry()
    registry.put(runs["run-1"], "run-1", ACTIVE)
    registry.put(runs["run-2"], "run-2", SHADOW, customers=("c1",))
    del registry.models[(SHADOW, G, "")]
    registry.generation_value += 1

    scored = _score(_engine(registry), "c1")["c1"]

    assert scored.shadow_version == "run-2"
    x = Profile().features(Event(WHEN.timestamp(), AMOUNT))
    forest = runs["run-2"].customer_models[0]
    assert forest.customer == "c1"
    assert scored.shadow_risk_score == runs["run-1"].global_model.score(x, forest.forest, 80).risk_score

    # Nothing active and no global model in the run: nothing to score the shadow with.
    del registry.models[(ACTIVE, G, "")]
    registry.generation_value += 1
    assert _score(_engine(registry), "c1")["c1"].shadow_version == ""


def test_shadow_models_that_cannot_be_loaded_never_fail_a_score(
    runs: dict[str, Trained], caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry()
    registry.put(runs["run-1"], "run-1", ACTIVE)
    registry.put(runs["run-2"], "run-2", SHADOW)
    engine = _engine(registry)
    plain = _score(_engine(_only_active(registry)), "c1", "c2")
    other_features = IsolationForest(n_estimators=2, random_state=0).fit(
        np.random.default_rng(0).random((20, 3))
    )
    registry.models[(SHADOW, C, "c1")] = _record(
        C, "c1", "run-2", SHADOW, CompiledForest.from_sklearn(other_features).to_bytes()
    )
    registry.models[(SHADOW, C, "c2")] = _record(C, "c2", "run-2", SHADOW, b"not a model")
    registry.generation_value += 1

    with caplog.at_level(logging.ERROR, logger="posguard_server.scoring"):
        scored = _score(engine, "c1", "c2")

    for customer in ("c1", "c2"):
        assert scored[customer].risk_score == plain[customer].risk_score
        assert (scored[customer].shadow_version, scored[customer].shadow_risk_score) == ("", None)
    assert len([r for r in caplog.records if "shadow customer model" in r.getMessage()]) == 2

    registry.models[(SHADOW, G, "")] = _record(G, "", "run-2", SHADOW, b"not a model either")
    registry.generation_value += 1
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="posguard_server.scoring"):
        scored = _score(engine, "c1", "c2")
    assert {(e.shadow_version, e.shadow_risk_score) for e in scored.values()} == {("", None)}
    assert scored["c1"].risk_score == plain["c1"].risk_score
    assert any("shadow global model" in r.getMessage() for r in caplog.records)


def test_shadow_customer_models_are_cached_in_a_bounded_lru(runs: dict[str, Trained]) -> None:
    registry = Registry()
    registry.put(runs["run-1"], "run-1", ACTIVE)
    registry.put(runs["run-2"], "run-2", SHADOW)
    cache = ModelCache(registry, registry, refresh_seconds=0.0, capacity=2)  # type: ignore[arg-type]
    assert cache.serving()[1] is not None

    for customer in ("c1", "c2", "c1", "c3"):
        mine = cache.shadow_customer(customer)
        assert mine is not Unreadable.MODEL
    assert registry.reads["shadow_model"] == 1 + 3  # the global model, then c1, c2, c3 once each
    cache.shadow_customer("c2")  # evicted by c3 (c1 was used more recently)
    assert registry.reads["shadow_model"] == 5


def _only_active(registry: Registry) -> Registry:
    copy = Registry()
    copy.models = {key: record for key, record in registry.models.items() if key[0] is ACTIVE}
    copy.generation_value = 1
    return copy
