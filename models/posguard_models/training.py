"""Training: global and per-customer isolation forests, calibration and the label-feedback layer.

Input is a :class:`History` table (rows grouped by customer, time-ordered, as the store streams them); output
is a :class:`Trained` set of artifacts that the server loads without scikit-learn. Transactions reported as
fraud or chargeback never become training rows of a forest (they would teach it that fraud is normal), but
they stay in the history the features are computed from, as they stay in a customer's serving profile.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.ensemble import IsolationForest
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import average_precision_score

from posguard_models.features import FEATURES, batch_features
from posguard_models.forest import CompiledForest
from posguard_models.model import Calibration, Feedback, GlobalModel, logit

DAY = 86400.0


@dataclass(frozen=True, slots=True)
class TrainingConfig:
    """One configuration for every dataset; defaults are the measured ones of docs/risk-model.md."""

    seed: int = 0
    n_estimators: int = 100
    max_samples: int = 256
    customer_estimators: int = 50
    customer_min_history: int = 50
    # Weight of a customer's own forest is n / (n + combine_n0) for n training rows behind it.
    combine_n0: float = 1000.0
    feedback_windows_days: tuple[float, ...] = (7.0, 14.0, 28.0)
    prior_strength: float = 5.0


@dataclass(frozen=True, slots=True)
class History:
    """Column arrays, grouped by customer and time-ordered within each customer.

    ``keys`` is where a transaction happened for label feedback (the terminal, or the merchant when there is
    no terminal id); ``fraud`` marks rows reported as fraud or chargeback and ``label_times`` when (epoch
    seconds; NaN for unreported rows).
    """

    customers: npt.NDArray[Any]
    times: npt.NDArray[np.float64]
    amounts: npt.NDArray[np.float64]
    keys: npt.NDArray[Any]
    fraud: npt.NDArray[np.bool_]
    label_times: npt.NDArray[np.float64]

    def __post_init__(self) -> None:
        n = len(self.times)
        for name in ("customers", "amounts", "keys", "fraud", "label_times"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"history column {name} has the wrong length")


@dataclass(frozen=True, slots=True)
class CustomerModel:
    customer: str
    forest: CompiledForest
    sample_count: int
    window_start: float
    window_end: float


@dataclass(slots=True)
class Trained:
    global_model: GlobalModel
    customer_models: list[CustomerModel]
    sample_count: int
    window_start: float
    window_end: float
    metrics: dict[str, float] = field(default_factory=dict)


Progress = Callable[[int, int], None]


def train(history: History, config: TrainingConfig, progress: Progress | None = None) -> Trained:
    n = len(history.times)
    if n == 0:
        raise ValueError("no history to train on")
    X = batch_features(history.customers, history.times, history.amounts)  # noqa: N806 - matrix
    usable = ~history.fraud
    if not usable.any():
        raise ValueError("every history row is reported fraud: nothing to learn normal behaviour from")

    # Fit on the rows in a canonical order (time, then amount, then features), not in the order given:
    # history comes grouped by customer id, and ids are random, so two imports of the same data would
    # otherwise hand the forest different subsamples for the same seed.
    canonical = np.lexsort((*X.T[::-1], history.amounts, history.times))
    global_sk = IsolationForest(
        n_estimators=config.n_estimators,
        max_samples=min(config.max_samples, int(usable.sum())),
        random_state=config.seed,
    ).fit(X[canonical[usable[canonical]]])
    global_forest = CompiledForest.from_sklearn(global_sk)
    raw = -global_forest.score_samples(X)

    customers: list[CustomerModel] = []
    starts = np.flatnonzero(np.r_[True, history.customers[1:] != history.customers[:-1]])
    ends = np.r_[starts[1:], n]
    for done, (start, end) in enumerate(zip(starts, ends, strict=True)):
        rows = np.arange(start, end)[usable[start:end]]
        if len(rows) >= config.customer_min_history:
            model = IsolationForest(
                n_estimators=config.customer_estimators,
                max_samples=min(config.max_samples, len(rows)),
                random_state=config.seed,
            ).fit(X[rows])
            forest = CompiledForest.from_sklearn(model)
            weight = len(rows) / (len(rows) + config.combine_n0)
            raw[start:end] = weight * -forest.score_samples(X[start:end]) + (1 - weight) * raw[start:end]
            customers.append(
                CustomerModel(
                    customer=str(history.customers[start]),
                    forest=forest,
                    sample_count=len(rows),
                    window_start=float(history.times[rows[0]]),
                    window_end=float(history.times[rows[-1]]),
                )
            )
        if progress is not None:
            progress(done + 1, len(starts))

    calibration = Calibration.fit(raw[usable])
    anomaly_risk = calibration.many(raw)
    metrics: dict[str, float] = {"customer_models": float(len(customers))}
    feedback = _fit_feedback(history, anomaly_risk, config, metrics)
    model = GlobalModel(
        forest=global_forest,
        calibration=calibration,
        feature_quantiles=np.quantile(X[usable], np.linspace(0.0, 1.0, 1001), axis=0).T.copy(),
        combine_n0=config.combine_n0,
        customer_min_history=config.customer_min_history,
        feedback=feedback,
        meta={"sample_count": int(usable.sum()), "seed": config.seed, "features": list(FEATURES)},
    )
    return Trained(
        global_model=model,
        customer_models=customers,
        sample_count=int(usable.sum()),
        window_start=float(history.times.min()),
        window_end=float(history.times.max()),
        metrics=metrics,
    )


# -- label feedback -----------------------------------------------------------------------------------


def terminal_counts(
    history: History, window_days: float
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Per row: (customers with fraud reported by then, customers) at its key in the previous window.

    The same question the server asks its store when scoring: transactions at the key with event time in
    ``[t - window, t)``; fraud counts only where the report was in by ``t``.
    """
    window = window_days * DAY
    n = len(history.times)
    fraud_customers = np.zeros(n, dtype=np.int64)
    customers = np.zeros(n, dtype=np.int64)
    order = np.lexsort((history.times, history.keys))
    keys = history.keys[order]
    bounds = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1], True])
    for a, b in itertools.pairwise(bounds):
        rows = order[a:b]
        if keys[a] == "":
            continue
        t = history.times[rows]
        who = history.customers[rows]
        bad = history.fraud[rows]
        reported = history.label_times[rows]
        low = np.searchsorted(t, t - window, side="left")
        high = np.searchsorted(t, t, side="left")
        for j in range(len(rows)):
            if high[j] <= low[j]:
                continue
            span = slice(low[j], high[j])
            customers[rows[j]] = len(set(who[span].tolist()))
            hit = bad[span] & (reported[span] <= t[j])
            if hit.any():
                fraud_customers[rows[j]] = len(set(who[span][hit].tolist()))
    return fraud_customers, customers


def _fit_feedback(
    history: History, anomaly_risk: npt.NDArray[np.float64], config: TrainingConfig, metrics: dict[str, float]
) -> Feedback | None:
    if not history.fraud.any():
        return None
    # Rows old enough for their outcome to be known: up to the latest reported fraud.
    known = history.times <= np.nanmax(np.where(history.fraud, history.times, np.nan))
    y = history.fraud[known]
    if y.all() or not y.any():
        return None
    base_rate = float(y.mean())
    iso = IsotonicRegression(out_of_bounds="clip", y_min=1e-4, y_max=1 - 1e-4).fit(anomaly_risk[known], y)
    curve_x = np.asarray(iso.X_thresholds_, dtype=np.float64)
    curve_y = np.asarray(iso.y_thresholds_, dtype=np.float64)
    metrics["labelled_fraud"] = float(y.sum())
    metrics["ap_history_anomaly"] = float(average_precision_score(y, anomaly_risk[known]))

    best: tuple[float, float, npt.NDArray[np.float64]] | None = None
    probability_logit = np.array([logit(p) for p in np.interp(anomaly_risk, curve_x, curve_y)])
    for window in config.feedback_windows_days:
        draft = Feedback(window, config.prior_strength, base_rate, curve_x, curve_y, Calibration.fit([0.0]))
        frauds, seen = terminal_counts(history, window)
        evidence = np.array([draft.evidence(int(f), int(c)) for f, c in zip(frauds, seen, strict=True)])
        combined = probability_logit + evidence
        ap = float(average_precision_score(y, combined[known]))
        metrics[f"ap_history_feedback_{window:g}d"] = ap
        if best is None or ap > best[1]:
            best = (window, ap, combined)
    assert best is not None
    window, ap, combined = best
    metrics["feedback_window_days"] = window
    return Feedback(
        window_days=window,
        prior_strength=config.prior_strength,
        base_rate=base_rate,
        curve_x=curve_x,
        curve_y=curve_y,
        calibration=Calibration.fit(combined),
    )
