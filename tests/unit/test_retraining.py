"""Retraining pieces without a database: the fast exact forest fit, the worker function, model-set scoring."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest

from posguard_models.forest import CompiledForest
from posguard_models.retraining import CustomerForest, CustomerJob, ModelSet, fit_customers, set_risk
from posguard_models.training import (
    TrainingConfig,
    customer_spans,
    fit_isolation_forest,
    terminal_counts,
    train,
)

from .test_risk_model import _history, _table

CONFIG = TrainingConfig(seed=0, n_estimators=50, customer_estimators=20, customer_min_history=30)


@pytest.mark.parametrize("rows", [1, 2, 40, 256, 257, 1500])
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_fast_fit_is_scikit_learns_isolation_forest_bit_for_bit(rows: int, seed: int) -> None:
    rng = np.random.default_rng(rows * 31 + seed)
    data = rng.lognormal(size=(rows, 4))
    data[: rows // 3, 1] = 0.0  # a column with many ties, as a customer's zero-spend features have
    reference = CompiledForest.from_sklearn(
        IsolationForest(n_estimators=30, max_samples=min(256, rows), random_state=seed).fit(data)
    )
    ours = fit_isolation_forest(data, n_estimators=30, max_samples=256, seed=seed)
    probe = np.vstack([data, rng.lognormal(size=(200, 4)), rng.normal(size=(50, 4))])
    assert np.array_equal(ours.score_samples(probe), reference.score_samples(probe))
    assert ours.max_samples == min(256, rows)


def test_worker_function_is_pure_and_survives_pickling() -> None:
    rng = np.random.default_rng(3)
    jobs = [CustomerJob(f"c{i}", rng.lognormal(size=(80 + i, 4)), np.arange(80.0 + i)) for i in range(3)]
    shipped = pickle.loads(pickle.dumps(jobs))  # what a process pool or Dask does to the arguments
    a, b = fit_customers(jobs, CONFIG), fit_customers(shipped, CONFIG)
    probe = rng.lognormal(size=(100, 4))
    for x, y, job in zip(a, b, jobs, strict=True):
        assert (x.customer, x.sample_count, x.window_start, x.window_end) == (
            job.customer,
            len(job.X),
            0.0,
            job.times[-1],
        )
        assert np.array_equal(
            CompiledForest.from_bytes(x.artifact).score_samples(probe),
            CompiledForest.from_bytes(y.artifact).score_samples(probe),
        )
    with pytest.raises(ValueError, match="no rows"):
        fit_customers([CustomerJob("empty", np.zeros((0, 4)), np.zeros(0))], CONFIG)


def test_model_set_risk_equals_what_a_server_computes_row_by_row() -> None:
    """Offline evaluation and serving agree, or a comparison would judge a model no server runs."""
    table = _table("handbook")
    history = _history(table, np.arange(len(table["times"])), labels=True)
    trained = train(history, CONFIG)
    features = history.features()
    models = ModelSet(
        trained.global_model,
        {m.customer: CustomerForest(m.forest, m.sample_count) for m in trained.customer_models},
    )
    rows = np.zeros(len(features), dtype=np.bool_)
    rows[np.random.default_rng(0).choice(len(features), size=400, replace=False)] = True
    offline = set_risk(history, features, rows, models)

    feedback = trained.global_model.feedback
    assert feedback is not None  # the sample has reported fraud
    frauds, seen = terminal_counts(history, feedback.window_days)
    online = []
    for start, end in customer_spans(history.customers):
        own = models.customers.get(str(history.customers[start]))
        for i in np.flatnonzero(rows[start:end]) + start:
            score = trained.global_model.score(
                features[i],
                own.forest if own else None,
                own.sample_count if own else 0,
                (int(frauds[i]), int(seen[i])),
            )
            online.append(score.risk_score)
    np.testing.assert_allclose(offline, online, rtol=0, atol=1e-12)
