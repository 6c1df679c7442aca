"""The pieces of a retraining run that do not need the database: per-customer fitting and model-set scoring.

:func:`fit_customers` is the unit of work a retraining run hands to a process pool or a Dask worker: a
chunk of customers with their feature rows in, compact artifacts out. It is a pure, module-level function of
its arguments (the same seed for every customer), so where it runs changes nothing in what it returns.

:class:`ModelSet` and :func:`set_risk` score history rows with a whole set of models (a global model and the
customer forests next to it) the way a server would, vectorised, so a candidate run and the active models
can be compared on the same labelled transactions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from posguard_models.forest import CompiledForest
from posguard_models.model import CORE, GlobalModel
from posguard_models.training import (
    History,
    TrainingConfig,
    customer_spans,
    customer_weight,
    fit_customer_forest,
    terminal_counts,
)


@dataclass(frozen=True, slots=True)
class CustomerJob:
    """One customer's training rows (usable, time-ordered feature vectors) and their event times."""

    customer: str
    X: npt.NDArray[np.float64]
    times: npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class CustomerFit:
    customer: str
    artifact: bytes
    sample_count: int
    window_start: float
    window_end: float


def fit_customers(jobs: Sequence[CustomerJob], config: TrainingConfig) -> list[CustomerFit]:
    """Fit each customer's forest and serialise it; runs in worker processes, so it touches nothing shared."""
    out: list[CustomerFit] = []
    for job in jobs:
        if len(job.X) == 0 or len(job.X) != len(job.times):
            raise ValueError(f"customer {job.customer}: no rows to fit, or rows and times disagree")
        forest = fit_customer_forest(job.X, config)
        out.append(
            CustomerFit(
                customer=job.customer,
                artifact=forest.to_bytes(),
                sample_count=len(job.X),
                window_start=float(job.times[0]),
                window_end=float(job.times[-1]),
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class CustomerForest:
    forest: CompiledForest
    sample_count: int


@dataclass(frozen=True, slots=True)
class ModelSet:
    """What a server would score with: one global model and the customer forests beside it."""

    global_model: GlobalModel
    customers: Mapping[str, CustomerForest]


def blended_raw(
    history: History,
    X: npt.NDArray[np.float64],  # noqa: N803 - matrix
    rows: npt.NDArray[np.bool_],
    forest: CompiledForest,
    customers: Mapping[str, CustomerForest],
    n0: float,
) -> npt.NDArray[np.float64]:
    """The blended anomaly score ``raw`` of the selected rows (NaN elsewhere), as ``GlobalModel.anomaly``.

    Takes the global forest rather than a whole global model: a retrain blends before its calibration exists.
    """
    raw = np.full(len(X), np.nan)
    if not rows.any():
        return raw
    raw[rows] = -forest.score_samples(X[rows, :CORE])
    for start, end in customer_spans(history.customers):
        own = customers.get(str(history.customers[start]))
        picked = np.flatnonzero(rows[start:end]) + start
        if own is None or len(picked) == 0:
            continue
        weight = customer_weight(own.sample_count, n0)
        raw[picked] = weight * -own.forest.score_samples(X[picked, :CORE]) + (1 - weight) * raw[picked]
    return raw


def set_risk(
    history: History,
    X: npt.NDArray[np.float64],  # noqa: N803 - matrix
    rows: npt.NDArray[np.bool_],
    models: ModelSet,
    counts: dict[float, tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]] | None = None,
) -> npt.NDArray[np.float64]:
    """``risk_score`` of the selected rows under a model set, label feedback included (in row order).

    ``counts`` caches the place counts per feedback window between calls on the same rows.
    """
    model = models.global_model
    raw = blended_raw(history, X, rows, model.forest, models.customers, model.combine_n0)[rows]
    feedback = models.global_model.feedback
    if feedback is None:
        return models.global_model.risk_many(raw, X[rows])
    cache = counts if counts is not None else {}
    if feedback.window_days not in cache:
        cache[feedback.window_days] = terminal_counts(history, feedback.window_days, rows=rows)
    frauds, seen = cache[feedback.window_days]
    evidence = np.array(
        [feedback.evidence(int(f), int(c)) for f, c in zip(frauds[rows], seen[rows], strict=True)],
        dtype=np.float64,
    )
    return models.global_model.risk_many(raw, X[rows], evidence)
