"""Detection metrics of the evaluation protocol: AP, ROC-AUC and recall at a 1% alert rate, per scenario;
and how well the scores read as alert rates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sklearn.metrics import average_precision_score, roc_auc_score

ALERT_RATE = 0.01
# The score thresholds at which the share of traffic scoring at or above is checked against 1 - threshold.
CALIBRATION_LEVELS = (0.5, 0.9, 0.99, 0.999)


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


def alert_shares(scores: npt.NDArray[np.float64], alert_rate: float) -> npt.NDArray[np.float64]:
    """Each transaction's expected place in the alert set of the ``alert_rate`` highest scores.

    1 above the cut, 0 below it; the places left at the cut are shared equally among the scores tied there,
    so which of them would be alerted never depends on the order they arrived in.
    """
    k = max(1, int(len(scores) * alert_rate))
    cut = np.partition(scores, len(scores) - k)[len(scores) - k]  # the k-th highest score
    above = scores > cut
    tied = scores == cut
    shares: npt.NDArray[np.float64] = above.astype(np.float64)
    shares[tied] = (k - int(above.sum())) / int(tied.sum())
    return shares


def _recall(y: npt.NDArray[np.bool_], shares: npt.NDArray[np.float64]) -> float:
    return float(shares[y].sum() / max(1, int(y.sum())))


def detection(
    y: npt.ArrayLike, scores: npt.ArrayLike, *, shares: npt.NDArray[np.float64] | None = None
) -> Detection:
    """The metrics of ``scores`` against ``y``; recall in the alert set of these scores, or of ``shares``
    (the places of these rows in the alert set of a larger set, see ``by_scenario``)."""
    truth = np.asarray(y, dtype=np.bool_)
    s = np.asarray(scores, dtype=np.float64)
    if truth.all() or not truth.any():
        raise ValueError("metrics need both fraud and genuine transactions")
    return Detection(
        transactions=len(s),
        frauds=int(truth.sum()),
        average_precision=float(average_precision_score(truth, s)),
        roc_auc=float(roc_auc_score(truth, s)),
        recall_at_alert_rate=_recall(truth, alert_shares(s, ALERT_RATE) if shares is None else shares),
    )


def by_scenario(y: npt.ArrayLike, scores: npt.ArrayLike, scenarios: npt.ArrayLike) -> dict[int, Detection]:
    """Each fraud scenario against all genuine transactions (scenario 0 is genuine).

    AP and ROC-AUC rank the scenario's frauds among the genuine transactions; recall is the share of the
    scenario's frauds in the real alert set, the 1% highest scores of all transactions (other scenarios'
    frauds take places in it too), not in a set re-ranked without them.
    """
    truth = np.asarray(y, dtype=np.bool_)
    s = np.asarray(scores, dtype=np.float64)
    scenario = np.asarray(scenarios, dtype=np.int64)
    shares = alert_shares(s, ALERT_RATE)
    out: dict[int, Detection] = {}
    for k in sorted(set(scenario[truth].tolist())):
        rows = ~truth | (scenario == k)
        out[int(k)] = detection(truth[rows], s[rows], shares=shares[rows])
    return out


@dataclass(frozen=True, slots=True)
class Resolution:
    """How well a set of risk scores reads as alert rates: the share of traffic at or above each level of
    ``CALIBRATION_LEVELS`` (nominally ``1 - level``), how many distinct scores there are and the share of the
    most common one (ties at a cut make the alert set depend on arrival order)."""

    transactions: int
    at_or_above: dict[float, float]
    distinct: int
    most_common_share: float

    def as_dict(self) -> dict[str, float]:
        out = {f"at_or_above_{level:g}": share for level, share in self.at_or_above.items()}
        out.update({"distinct_scores": float(self.distinct), "most_common_share": self.most_common_share})
        return out


def resolution(scores: npt.ArrayLike) -> Resolution:
    s = np.asarray(scores, dtype=np.float64)
    if len(s) == 0:
        raise ValueError("resolution needs scores")
    _, counts = np.unique(s, return_counts=True)
    return Resolution(
        transactions=len(s),
        at_or_above={level: float(np.mean(s >= level)) for level in CALIBRATION_LEVELS},
        distinct=len(counts),
        most_common_share=float(counts.max() / len(s)),
    )
