"""Retraining: incremental selection, joblib and Dask equal to one process, safe promotion, a dying worker."""

from __future__ import annotations

import collections
import os
import signal
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from posguard_models.forest import CompiledForest
from posguard_models.model import GlobalModel
from posguard_models.training import TrainingConfig
from posguard_server.config import Settings
from posguard_server.domain.risk import (
    METRIC_AP,
    METRIC_BASELINE_AP,
    METRIC_EVALUATED_AT,
    ModelScope,
    ModelStatus,
    NewTransaction,
)
from posguard_server.issuers import build_numbering
from posguard_server.pipeline.dask_local import local_dask_cluster
from posguard_server.pipeline.importer import Importer, read_outcomes, read_transactions
from posguard_server.pipeline.retrain import PromotionMode, RetrainOptions, RetrainResult, retrain

if TYPE_CHECKING:
    from posguard_server.store.db import Database

    from ..conftest import RiskStores

SAMPLE = Path(__file__).parents[1] / "data" / "handbook_sample.csv.gz"
CONFIG = TrainingConfig(seed=0, n_estimators=30, customer_estimators=10, customer_min_history=30)


@pytest.fixture
def store(database: Database, risk_stores: RiskStores, tmp_path: Path) -> RiskStores:
    """The handbook sample (30 customers, 7,721 transactions, 217 reported fraud) in a fresh database."""
    importer = Importer.on(
        database, build_numbering(Settings(data_dir=tmp_path / "data")), namespace="source"
    )
    importer.import_rows(read_transactions(SAMPLE))
    importer.import_outcomes(read_outcomes(SAMPLE, delay=timedelta(days=7)))
    return risk_stores


def _run(store: RiskStores, **options: object) -> RetrainResult:
    return retrain(store.history, store.registry, store.shadow, RetrainOptions(config=CONFIG, **options))  # type: ignore[arg-type]


def _active_versions(store: RiskStores) -> dict[tuple[ModelScope, str], str]:
    return {(m.scope, m.customer_id): m.version for m in store.registry.active_models()}


def _forests(store: RiskStores, version: str) -> dict[str, CompiledForest]:
    models, _ = store.registry.list_models(version=version, limit=1000)
    return {
        m.customer_id: CompiledForest.from_bytes(
            store.registry.get_model(m.scope, m.customer_id, version).artifact
        )  # type: ignore[union-attr,arg-type]
        for m in models
        if m.scope is ModelScope.CUSTOMER
    }


def _same_run(store: RiskStores, a: str, b: str) -> None:
    """Two runs produced the same models: every customer forest and the global model score identically."""
    probe = np.random.default_rng(7).lognormal(size=(200, 4))
    left, right = _forests(store, a), _forests(store, b)
    assert left.keys() == right.keys()
    assert left
    for customer in left:
        assert np.array_equal(left[customer].score_samples(probe), right[customer].score_samples(probe))
    global_a = GlobalModel.from_bytes(store.registry.get_model(ModelScope.GLOBAL, "", a).artifact)  # type: ignore[union-attr,arg-type]
    global_b = GlobalModel.from_bytes(store.registry.get_model(ModelScope.GLOBAL, "", b).artifact)  # type: ignore[union-attr,arg-type]
    assert np.array_equal(global_a.forest.score_samples(probe), global_b.forest.score_samples(probe))
    assert np.array_equal(global_a.calibration.scores, global_b.calibration.scores)


def test_first_run_trains_everyone_and_a_rerun_with_nothing_new_trains_nothing(store: RiskStores) -> None:
    first = _run(store)
    assert first.version
    assert first.global_trained
    assert first.trained == 30
    assert first.promotion == "promoted"  # nothing was active: nothing to be worse than
    active = _active_versions(store)
    assert active[(ModelScope.GLOBAL, "")] == first.version
    assert sum(1 for scope, _ in active if scope is ModelScope.CUSTOMER) == 30
    assert first.evaluation is not None
    assert first.evaluation.metrics[METRIC_AP] > 0.2
    assert all(size <= 50_000 for size in first.artifact_bytes)

    again = _run(store)
    assert again.version == ""
    assert again.trained == 0
    assert not again.global_trained
    assert again.skipped == {"under 20 new transactions since the last model": 30}
    assert again.promotion == "nothing new"
    assert _active_versions(store) == active


def test_new_history_retrains_only_the_customers_who_have_it(store: RiskStores) -> None:
    # No held-out days here: every transaction is training history as soon as it is stored.
    first = _run(store, holdout_days=0)
    customer = sorted(c for s, c in _active_versions(store) if s is ModelScope.CUSTOMER)[0]
    history = next(iter(store.history.history(customer_ids=[customer])))
    start = max(history.event_times) + timedelta(minutes=5)
    times = [start + timedelta(minutes=30 * i) for i in range(25)]
    store.history.import_transactions(
        [
            NewTransaction(
                transaction_id=f"later-{i}",
                customer_id=customer,
                event_time=when,
                amount_minor=2_000 + 10 * i,
                currency="EUR",
                merchant_id="T-later",
                terminal_id="T-later",
                mcc="",
                channel=history.channels[0],
                latitude=None,
                longitude=None,
            )
            for i, when in enumerate(times)
        ]
    )
    second = _run(store, holdout_days=0, promotion=PromotionMode.FORCE)  # no held-out rows to compare on
    assert second.trained == 1
    assert not second.global_trained
    active = _active_versions(store)
    assert active[(ModelScope.CUSTOMER, customer)] == second.version
    assert active[(ModelScope.GLOBAL, "")] == first.version
    others = {v for (s, c), v in active.items() if s is ModelScope.CUSTOMER and c != customer}
    assert others == {first.version}


def test_all_and_customers_override_the_incremental_choice(store: RiskStores) -> None:
    _run(store)
    some = sorted(c for s, c in _active_versions(store) if s is ModelScope.CUSTOMER)[:3]
    picked = _run(store, customers=frozenset(some), promotion=PromotionMode.NEVER)
    assert picked.trained == 3
    assert not picked.global_trained
    assert picked.skipped["not asked for"] == 27
    everyone = _run(store, everyone=True, promotion=PromotionMode.NEVER)
    assert everyone.trained == 30
    assert everyone.global_trained
    # Three runs are registered now; a run's models are found by its version alone.
    run, more = store.registry.list_models(version=picked.version, limit=100)
    assert more is None
    assert sorted(m.customer_id for m in run) == sorted(some)


def test_joblib_processes_give_the_same_models_as_one_process(store: RiskStores) -> None:
    one = _run(store, everyone=True, promotion=PromotionMode.NEVER)
    pooled = _run(store, everyone=True, promotion=PromotionMode.NEVER, jobs=2, chunk_size=4)
    _same_run(store, one.version, pooled.version)
    assert pooled.evaluation is not None
    assert one.evaluation is not None
    assert pooled.evaluation.metrics[METRIC_AP] == one.evaluation.metrics[METRIC_AP]


@pytest.mark.slow
def test_a_dask_cluster_gives_the_same_models_even_when_a_worker_dies(store: RiskStores) -> None:
    local = _run(store, everyone=True, promotion=PromotionMode.NEVER)
    with local_dask_cluster(2) as cluster:
        on_dask = _run(
            store, everyone=True, promotion=PromotionMode.NEVER, dask_scheduler=cluster.address, chunk_size=2
        )
        _same_run(store, local.version, on_dask.version)

        # Kill one worker (SIGKILL: no goodbye to the scheduler) once the first chunk is back: the scheduler
        # runs its chunks again on the other worker, and the run still writes every model, the same ones.
        victim = cluster.workers[0]

        def kill_once(done: int) -> None:
            if done == 1 and victim.poll() is None:
                os.kill(victim.pid, signal.SIGKILL)

        survived = retrain(
            store.history,
            store.registry,
            store.shadow,
            RetrainOptions(
                config=CONFIG,
                everyone=True,
                promotion=PromotionMode.NEVER,
                dask_scheduler=cluster.address,
                chunk_size=1,
            ),
            on_chunk=kill_once,
        )
        assert victim.wait(timeout=10) == -signal.SIGKILL
    assert survived.trained == 30
    _same_run(store, local.version, survived.version)


def test_promotion_refuses_a_worse_candidate_and_keeps_the_active_models(store: RiskStores) -> None:
    good = _run(store)
    active = _active_versions(store)
    good_active_at = store.registry.active_model(ModelScope.GLOBAL, "").activated_at  # type: ignore[union-attr]
    # Two-sample trees: barely better than chance, so worse than the active models on held-out labels.
    bad_config = replace(CONFIG, seed=3, n_estimators=2, customer_estimators=1, max_samples=2)
    worse = retrain(
        store.history, store.registry, store.shadow, RetrainOptions(config=bad_config, everyone=True)
    )
    assert worse.evaluation is not None
    metrics = worse.evaluation.metrics
    assert metrics[METRIC_AP] < metrics[METRIC_BASELINE_AP]
    assert worse.promotion.startswith("refused")
    assert "worse than the active model" in worse.promotion
    assert _active_versions(store) == active
    candidate = store.registry.get_model(ModelScope.GLOBAL, "", worse.version)
    assert candidate is not None
    assert candidate.status is ModelStatus.CANDIDATE
    assert candidate.metrics[METRIC_EVALUATED_AT] > good_active_at.timestamp()
    assert good.version in active.values()

    forced = retrain(
        store.history,
        store.registry,
        store.shadow,
        RetrainOptions(config=bad_config, everyone=True, promotion=PromotionMode.FORCE),
    )
    assert forced.promotion == "promoted (forced)"
    assert _active_versions(store)[(ModelScope.GLOBAL, "")] == forced.version


def test_a_run_can_go_into_shadow_instead(store: RiskStores) -> None:
    _run(store)
    shadow = retrain(
        store.history,
        store.registry,
        store.shadow,
        RetrainOptions(config=replace(CONFIG, seed=1), everyone=True, promotion=PromotionMode.SHADOW),
    )
    assert shadow.promotion.startswith("in shadow")
    model = store.registry.get_model(ModelScope.GLOBAL, "", shadow.version)
    assert model is not None
    assert model.status is ModelStatus.SHADOW
    assert shadow.evaluation is not None
    assert shadow.evaluation.metrics[METRIC_AP] >= shadow.evaluation.metrics[METRIC_BASELINE_AP]

    # Shadowing moved the registry generation (servers reloaded), but nothing new became active: the
    # comparison still holds and the run is promoted without force.
    promoted = store.registry.promote(
        ModelScope.GLOBAL, "", shadow.version, force=False, now=datetime.now(UTC), actor="t", reason="watched"
    )
    assert not promoted.forced
    assert _active_versions(store)[(ModelScope.GLOBAL, "")] == shadow.version


def test_holdout_rows_are_never_training_rows(store: RiskStores) -> None:
    result = _run(store, holdout_days=10)
    assert result.evaluation is not None
    assert result.evaluation.window_start is not None
    model = store.registry.get_model(ModelScope.GLOBAL, "", result.version)
    assert model is not None
    assert model.training_window_end < result.evaluation.window_start
    assert datetime.now(UTC) > result.evaluation.window_start


def test_a_holdout_longer_than_the_history_is_a_clear_error(store: RiskStores) -> None:
    with pytest.raises(ValueError, match="lower --holdout-days"):
        _run(store, holdout_days=10_000)
    assert store.registry.list_models()[0] == []


def test_since_counts_new_history_from_a_date(store: RiskStores) -> None:
    _run(store, holdout_days=0)
    # The sample's last 40 days: each customer makes about 1.4 payments a day, so some have 20 since then.
    since = datetime(2018, 6, 20, tzinfo=UTC)
    counts: collections.Counter[str] = collections.Counter()
    for batch in store.history.history():  # usable rows: reported fraud left out, as training leaves it out
        counts.update(c for c, t in zip(batch.customer_ids, batch.event_times, strict=True) if t > since)
    recent = _run(store, holdout_days=0, since=since, promotion=PromotionMode.NEVER)
    assert recent.trained == sum(1 for n in counts.values() if n >= 20)
    assert 0 < recent.trained < 30
