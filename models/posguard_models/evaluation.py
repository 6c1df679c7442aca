"""Detection metrics of the evaluation protocol: AP, ROC-AUC and recall at a 1% alert rate, per scenario."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sklearn.metrics import average_precision_score, roc_auc_score

ALERT_RATE = 0.01


@dataclass(frozen=True, slots=True)
class Detection:
    transactions: int
    frauds: int
    average_precision: float
    roc_auc: float
    recall_at_alert_rate: float

    def as_dict(self) -> dict[str, float]:
        return {
            "transactions": float(self.transactions),
            "frauds": float(self.frauds),
            "ap": self.average_precision,
            "roc_auc": self.roc_auc,
            "recall_at_1pct": self.recall_at_alert_rate,
        }


def recall_at(y: npt.NDArray[np.bool_], scores: npt.NDArray[np.float64], alert_rate: float) -> float:
    """Share of fraud among the ``alert_rate`` highest scores (ties broken by arrival order)."""
    k = max(1, int(len(scores) * alert_rate))
    top = np.argsort(-scores, kind="stable")[:k]
    return float(y[top].sum() / max(1, y.sum()))


def detection(y: npt.ArrayLike, scores: npt.ArrayLike) -> Detection:
    truth = np.asarray(y, dtype=np.bool_)
    s = np.asarray(scores, dtype=np.float64)
    if truth.all() or not truth.any():
        raise ValueError("metrics need both fraud and genuine transactions")
    return Detection(
        transactions=len(s),
        frauds=int(truth.sum()),
        average_precision=float(average_precision_score(truth, s)),
        roc_auc=float(roc_auc_score(truth, s)),
        recall_at_alert_rate=recall_at(truth, s, ALERT_RATE),
    )


def by_scenario(y: npt.ArrayLike, scores: npt.ArrayLike, scenarios: npt.ArrayLike) -> dict[int, Detection]:
    """Each fraud scenario against all genuine transactions (scenario 0 is genuine)."""
    truth = np.asarray(y, dtype=np.bool_)
    s = np.asarray(scores, dtype=np.float64)
    scenario = np.asarray(scenarios, dtype=np.int64)
    out: dict[int, Detection] = {}
    for k in sorted(set(scenario[truth].tolist())):
        rows = ~truth | (scenario == k)
        out[int(k)] = detection(truth[rows], s[rows])
    return out
