"""Training: global and per-customer isolation forests, calibration and the label-feedback layer.

Input is a :class:`History` table (rows grouped by customer, time-ordered, as the store streams them); output
is a :class:`Trained` set of artifacts that the server loads without scikit-learn. Transactions reported as
fraud or chargeback never become training rows of a forest (they would teach it that fraud is normal), but
they stay in the history the features are computed from, as they stay in a customer's serving profile.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.ensemble import IsolationForest
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import average_precision_score

from posguard_models.features import FEATURES, batch_features
from posguard_models.forest import CompiledForest
from posguard_models.model import (
    CORE,
    Calibration,
    Feedback,
    GlobalModel,
    GroupForest,
    group_columns,
    logit,
    statistic,
)
from posguard_models.training_config import TrainingConfig as TrainingConfig  # re-exported for callers

DAY = 86400.0
# Log-odds the anomaly risk adds, at most, to the label-feedback score to break its ties (Feedback.combined):
# far below any difference the fraud curve or the evidence makes, far above float64 resolution (adjacent
# anomaly risks of a million-row reference differ by ~1e-6, i.e. ~1e-9 log-odds, against ~1e-15 rounding).
FEEDBACK_TIE_BREAK = 1e-3


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
    # Where each transaction happened, in degrees (NaN where the request had no location); None: nowhere.
    latitudes: npt.NDArray[np.float64] | None = None
    longitudes: npt.NDArray[np.float64] | None = None

    def __post_init__(self) -> None:
        n = len(self.times)
        for name in ("customers", "amounts", "keys", "fraud", "label_times", "latitudes", "longitudes"):
            column = getattr(self, name)
            if column is not None and len(column) != n:
                raise ValueError(f"history column {name} has the wrong length")

    def features(self) -> npt.NDArray[np.float64]:
        """The feature matrix of every row, as the profile would have given it at each transaction."""
        return batch_features(
            self.customers, self.times, self.amounts, self.keys, self.latitudes, self.longitudes
        )


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


def usable_rows(history: History, until: float | None = None) -> npt.NDArray[np.bool_]:
    """Rows a forest may learn from: not reported fraud, and (with ``until``) before that event time."""
    usable = ~history.fraud
    if until is not None:
        usable &= history.times < until
    return usable


def fit_global_forest(
    history: History,
    X: npt.NDArray[np.float64],  # noqa: N803 - matrix
    usable: npt.NDArray[np.bool_],
    config: TrainingConfig,
    columns: Sequence[int] | None = None,
) -> CompiledForest:
    """A population forest over ``columns`` of ``X`` (the core features by default), fitted on the usable rows
    in a canonical order.

    Canonical order (time, then amount, then features), not the order given: history comes grouped by
    customer id, and ids are random, so two imports of the same data would otherwise hand the forest different
    subsamples for the same seed.
    """
    X = X[:, :CORE] if columns is None else X[:, list(columns)]  # noqa: N806 - matrix
    if not usable.any():
        raise ValueError("every history row is reported fraud: nothing to learn normal behaviour from")
    canonical = np.lexsort((*X.T[::-1], history.amounts, history.times))
    model = IsolationForest(
        n_estimators=config.n_estimators,
        max_samples=min(config.max_samples, int(usable.sum())),
        random_state=config.seed,
    ).fit(X[canonical[usable[canonical]]])
    return CompiledForest.from_sklearn(model)


def fit_customer_forest(X: npt.NDArray[np.float64], config: TrainingConfig) -> CompiledForest:  # noqa: N803 - matrix
    """One customer's forest over the core features of its usable rows, in time order; the same seed for
    every customer."""
    return fit_isolation_forest(
        X[:, :CORE], n_estimators=config.customer_estimators, max_samples=config.max_samples, seed=config.seed
    )


_MAX_INT = int(np.iinfo(np.int32).max)


def fit_isolation_forest(
    X: npt.NDArray[np.float64],  # noqa: N803 - matrix
    *,
    n_estimators: int,
    max_samples: int,
    seed: int,
) -> CompiledForest:
    """Exactly ``IsolationForest(n_estimators, max_samples=min(max_samples, n), random_state=seed).fit(X)``.

    Why: a per-customer forest is small (tens of trees, a few hundred rows), and scikit-learn's ensemble
    spends about 1.3 ms per tree cloning and validating estimators, three quarters of the fit, which caps
    retraining at about 13 customers per second per core. This builds the same ``ExtraTreeRegressor`` trees
    scikit-learn builds, drawing every random number as ``IsolationForest.fit`` and ``BaseBagging._fit`` do
    (read in scikit-learn 1.9.1: the targets from ``RandomState(seed).uniform``, one seed per tree from a
    second ``RandomState(seed)``, each tree's own seed and its rows from ``RandomState(tree seed)``, the rows
    passed as 0/1 sample weights), so the forest is the same tree for tree. A test holds it to
    ``IsolationForest`` bit for bit over seeds and shapes; if a scikit-learn release changes how it draws,
    that test fails and this function should follow or go.
    """
    from sklearn import config_context
    from sklearn.tree import ExtraTreeRegressor
    from sklearn.utils.random import sample_without_replacement

    rows = np.ascontiguousarray(X, dtype=np.float32)
    n, n_features = rows.shape
    if n == 0:
        raise ValueError("no rows to fit")
    samples = min(max_samples, n)
    targets = np.random.RandomState(seed).uniform(size=n)
    seeds = np.random.RandomState(seed).randint(_MAX_INT, size=n_estimators)
    max_depth = int(np.ceil(np.log2(max(samples, 2))))
    trees: list[Any] = []
    features: list[npt.NDArray[np.int64]] = []
    # Two generators re-seeded per tree: ``seed(s)`` leaves exactly the state ``RandomState(s)`` starts in,
    # while constructing a RandomState first gathers OS entropy it then discards, which cost about a quarter
    # of a customer's fit (three constructions per tree, one of them inside the tree's own fit).
    draw, own = np.random.RandomState(), np.random.RandomState()
    # The arguments are ours and already checked: skip scikit-learn's per-call parameter validation.
    with config_context(skip_parameter_validation=True):
        for tree_seed in seeds:
            draw.seed(tree_seed)
            own.seed(draw.randint(_MAX_INT))
            draw.seed(tree_seed)
            columns = sample_without_replacement(n_features, n_features, random_state=draw)
            picked = sample_without_replacement(n, samples, random_state=draw)
            # The fitted tree keeps ``own`` as its random_state; only its structure is compiled below.
            tree = ExtraTreeRegressor(
                max_features=1, splitter="random", max_depth=max_depth, random_state=own
            )
            weights = np.bincount(picked, minlength=n).astype(np.float64)
            tree.fit(rows, targets, sample_weight=weights, check_input=False)
            trees.append(tree)
            features.append(np.asarray(columns, dtype=np.int64))
    return CompiledForest.from_trees(trees, features, n_features=n_features, max_samples=samples, offset=-0.5)


def customer_weight(sample_count: int, config_n0: float) -> float:
    """Weight of a customer's own forest in the blend: n / (n + n0) for n training rows behind it."""
    return sample_count / (sample_count + config_n0)


def customer_spans(customers: npt.NDArray[Any]) -> list[tuple[int, int]]:
    """(start, end) of each customer's block of rows (history is grouped by customer)."""
    n = len(customers)
    if n == 0:
        return []
    starts = np.flatnonzero(np.r_[True, customers[1:] != customers[:-1]])
    ends = np.r_[starts[1:], n]
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


def train(
    history: History, config: TrainingConfig, progress: Progress | None = None, *, jobs: int = 1
) -> Trained:
    """Global and per-customer models of ``history``; ``jobs`` > 1 fits the customer forests on that many
    processes (the forests are the same: each is a function of its rows and the seed alone)."""
    n = len(history.times)
    if n == 0:
        raise ValueError("no history to train on")
    X = history.features()  # noqa: N806 - matrix
    usable = usable_rows(history)
    global_forest = fit_global_forest(history, X, usable, config)
    raw = -global_forest.score_samples(X[:, :CORE])

    spans = customer_spans(history.customers)
    rows_of = [np.arange(start, end)[usable[start:end]] for start, end in spans]
    own = [i for i, rows in enumerate(rows_of) if len(rows) >= config.customer_min_history]
    forests = _fit_customer_forests([X[rows_of[i]] for i in own], config, jobs, progress)
    customers: list[CustomerModel] = []
    for i, forest in zip(own, forests, strict=True):
        (start, end), rows = spans[i], rows_of[i]
        weight = customer_weight(len(rows), config.combine_n0)
        own_raw = -forest.score_samples(X[start:end, :CORE])
        raw[start:end] = weight * own_raw + (1 - weight) * raw[start:end]
        customers.append(
            CustomerModel(
                customer=str(history.customers[start]),
                forest=forest,
                sample_count=len(rows),
                window_start=float(history.times[rows[0]]),
                window_end=float(history.times[rows[-1]]),
            )
        )

    metrics: dict[str, float] = {"customer_models": float(len(customers))}
    model = global_model(history, X, usable, np.ones(n, dtype=np.bool_), raw, global_forest, config, metrics)
    return Trained(
        global_model=model,
        customer_models=customers,
        sample_count=int(usable.sum()),
        window_start=float(history.times.min()),
        window_end=float(history.times.max()),
        metrics=metrics,
    )


# Customers per task on a process pool: enough to amortise sending the rows and the forests back.
_FIT_CHUNK = 64


def _fit_customer_forests(
    matrices: list[npt.NDArray[np.float64]], config: TrainingConfig, jobs: int, progress: Progress | None
) -> list[CompiledForest]:
    """One forest per matrix, in order; on ``jobs`` processes when more than one (artifacts travel back)."""
    if jobs <= 1:
        forests = []
        for done, X in enumerate(matrices):  # noqa: N806 - matrix
            forests.append(fit_customer_forest(X, config))
            if progress is not None:
                progress(done + 1, len(matrices))
        return forests
    from joblib import Parallel, delayed

    chunks = [matrices[i : i + _FIT_CHUNK] for i in range(0, len(matrices), _FIT_CHUNK)]
    forests = []
    for artifacts in Parallel(n_jobs=jobs, return_as="generator")(
        delayed(_fit_serialised)(chunk, config) for chunk in chunks
    ):
        forests += [CompiledForest.from_bytes(artifact) for artifact in artifacts]
        if progress is not None:
            progress(len(forests), len(matrices))
    return forests


def _fit_serialised(matrices: list[npt.NDArray[np.float64]], config: TrainingConfig) -> list[bytes]:
    """Runs in a worker process: fit each forest and return its artifact (what the registry stores)."""
    return [fit_customer_forest(X, config).to_bytes() for X in matrices]


def global_model(
    history: History,
    X: npt.NDArray[np.float64],  # noqa: N803 - matrix
    usable: npt.NDArray[np.bool_],
    window: npt.NDArray[np.bool_],
    raw: npt.NDArray[np.float64],
    forest: CompiledForest,
    config: TrainingConfig,
    metrics: dict[str, float],
) -> GlobalModel:
    """The global model around a fitted core forest: the group forests, calibration and feedback.

    ``raw`` is the blended core score of every history row under the model set this global model will serve
    with (its forest and the customer forests next to it). The group forests and every calibration learn from
    the ``usable`` rows, feedback from the rows of the training ``window`` (reported fraud included), so rows
    held out for evaluation stay unseen.
    """
    core_calibration = Calibration.fit(raw[usable])
    groups = []
    for name, columns in group_columns():
        group_forest = fit_global_forest(history, X, usable, config, columns)
        group_raw = -group_forest.score_samples(X[:, columns][usable])
        groups.append(GroupForest(name, columns, group_forest, Calibration.fit(group_raw)))
    combined = statistic(raw, X, groups, core_calibration)[0]
    calibration = Calibration.fit(combined[usable])
    anomaly_risk = calibration.many(combined)
    feedback = _fit_feedback(history, anomaly_risk, config, metrics, window)
    return GlobalModel(
        forest=forest,
        calibration=calibration,
        feature_quantiles=np.quantile(X[usable], np.linspace(0.0, 1.0, 1001), axis=0).T.copy(),
        combine_n0=config.combine_n0,
        customer_min_history=config.customer_min_history,
        feedback=feedback,
        meta={"sample_count": int(usable.sum()), "seed": config.seed, "features": list(FEATURES)},
        groups=tuple(groups),
        core_calibration=core_calibration,
    )


# -- label feedback -----------------------------------------------------------------------------------


def terminal_counts(
    history: History, window_days: float, *, rows: npt.NDArray[np.bool_] | None = None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Per row: (customers with fraud reported by then, customers) at its key in the previous window.

    The same question the server asks its store when scoring: transactions at the key with event time in
    ``[t - window, t)``; fraud counts only where the report was in by ``t``. With ``rows``, only those rows
    are counted (the others stay 0); every row still counts as activity for them.
    """
    window = window_days * DAY
    n = len(history.times)
    fraud_customers = np.zeros(n, dtype=np.int64)
    customers = np.zeros(n, dtype=np.int64)
    order = np.lexsort((history.times, history.keys))
    keys = history.keys[order]
    bounds = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1], True])
    for a, b in itertools.pairwise(bounds):
        at_key = order[a:b]
        if keys[a] == "":
            continue
        t = history.times[at_key]
        who = history.customers[at_key]
        bad = history.fraud[at_key]
        reported = history.label_times[at_key]
        low = np.searchsorted(t, t - window, side="left")
        high = np.searchsorted(t, t, side="left")
        wanted = range(len(at_key)) if rows is None else np.flatnonzero(rows[at_key]).tolist()
        for j in wanted:
            if high[j] <= low[j]:
                continue
            span = slice(low[j], high[j])
            customers[at_key[j]] = len(set(who[span].tolist()))
            hit = bad[span] & (reported[span] <= t[j])
            if hit.any():
                fraud_customers[at_key[j]] = len(set(who[span][hit].tolist()))
    return fraud_customers, customers


def _fit_feedback(
    history: History,
    anomaly_risk: npt.NDArray[np.float64],
    config: TrainingConfig,
    metrics: dict[str, float],
    in_window: npt.NDArray[np.bool_],
) -> Feedback | None:
    fraud = history.fraud & in_window
    if not fraud.any():
        return None
    # Rows of the window old enough for their outcome to be known: up to the latest reported fraud.
    known = in_window & (history.times <= np.nanmax(np.where(fraud, history.times, np.nan)))
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
        draft = Feedback(
            window,
            config.prior_strength,
            base_rate,
            curve_x,
            curve_y,
            Calibration.fit([0.0]),
            FEEDBACK_TIE_BREAK,
        )
        frauds, seen = terminal_counts(history, window, rows=in_window)
        evidence = np.array([draft.evidence(int(f), int(c)) for f, c in zip(frauds, seen, strict=True)])
        # As Feedback.combined computes it, in the same order.
        combined = probability_logit + evidence + FEEDBACK_TIE_BREAK * anomaly_risk
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
        calibration=Calibration.fit(combined[in_window]),
        tie_break=FEEDBACK_TIE_BREAK,
    )
