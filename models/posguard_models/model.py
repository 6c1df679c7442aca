"""Scoring with trained models: combining per-customer and global forests, calibration, label feedback.

How a transaction is scored (docs/risk-model.md says why):

1. **Anomaly.** ``s = -score_samples(x)`` in (0, 1] from the global forest, and from the customer's own forest
   when the customer has one. Both are isolation-forest scores normalised by the expected path length of their
   own sample size, so they share a scale; they are blended by how much history backs the customer's model:
   ``raw = w * s_customer + (1 - w) * s_global`` with ``w = n / (n + n0)``. A customer without a model (too
   little history) gets the global score alone: that is the explicit cold start.
2. **Calibration.** ``risk_score`` is the mid-rank fraction of the training window's transactions below this
   score (ties count half), so ``1 - risk_score`` reads as the alert rate at every level: flagging everything
   at or above 0.99 alerts on about 1% of traffic, at or above 0.5 on about half.
3. **Label feedback** (only when the training window had reported fraud). Fraud reported at a terminal (or
   merchant) by *several different customers* is the classic common point of compromise. The estimated
   probability of fraud of the anomaly score (isotonic, fitted on labelled history) is raised in log-odds by
   the terminal's excess fraud rate over the base rate, the anomaly risk breaks the ties left, and the result
   is calibrated again as above.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from posguard_models.features import FEATURE_VERSION, FEATURES
from posguard_models.forest import CompiledForest

FORMAT: Final = "posguard.global-risk-model"
FORMAT_VERSION: Final = 1
_EPS: Final = 1e-6
# Below this many rows a forest scores them one by one (``score_one`` equals ``score_samples`` bit for bit).
_BATCH_WALK_MIN_ROWS: Final = 4
# Score distance over which the tail beyond the training maximum halves its remaining mass (~e-fold).
TAIL_SCALE: Final = 0.02


def logit(p: float) -> float:
    p = min(max(p, _EPS), 1.0 - _EPS)
    return math.log(p / (1.0 - p))


@dataclass(frozen=True, slots=True)
class Calibration:
    """A mid-rank empirical distribution function stored as (score, fraction) knots.

    A knot is a distinct reference score with its mid-rank fraction: the share of reference scores below it
    plus half the share equal to it. Between knots the fraction is interpolated linearly, so the share of
    the reference at or above a risk ``r`` is about ``1 - r`` at every level, not only in the tail; a score
    shared by many reference rows (one-sided feature vectors tie often) sits in the middle of the range it
    covers, so no threshold inside that range is off by more than half of it (mapping ties to the top of
    their range, as format 1's fit did, overstated every threshold inside it by the whole range).
    """

    scores: npt.NDArray[np.float64]
    fractions: npt.NDArray[np.float64]

    @classmethod
    def fit(cls, reference: npt.ArrayLike, knots: int = 4096) -> Calibration:
        ref = np.asarray(reference, dtype=np.float64)
        if len(ref) == 0:
            raise ValueError("calibration needs at least one reference score")
        values, counts = np.unique(ref, return_counts=True)
        at_or_below = np.cumsum(counts) / len(ref)
        mid = at_or_below - counts / (2.0 * len(ref))
        if len(values) > knots:
            # Too many distinct scores to keep: keep those whose range holds a target fraction, the targets
            # evenly spread and, as densely again, geometric towards the top where alert thresholds live.
            # Every tie group wider than the spacing holds a target, so it keeps its own knot.
            targets = np.concatenate(
                [np.linspace(0.0, 1.0, knots // 2), 1.0 - np.geomspace(1.0, 1.0 / len(ref), knots // 2)]
            )
            picked = np.minimum(np.searchsorted(at_or_below, targets, side="left"), len(values) - 1)
            keep = np.unique(np.concatenate([[0, len(values) - 1], picked]))
            values, mid = values[keep], mid[keep]
        return cls(values, mid)

    def __call__(self, score: float) -> float:
        return float(self.many(np.array([score]))[0])

    def many(self, scores: npt.ArrayLike) -> npt.NDArray[np.float64]:
        s = np.asarray(scores, dtype=np.float64)
        inside = np.interp(s, self.scores, self.fractions)
        # Beyond the highest reference score the remaining mass decays smoothly towards 1, so transactions
        # more unusual than anything seen in training still rank by how unusual they are instead of tying.
        top, rest = self.scores[-1], 1.0 - self.fractions[-1]
        beyond = 1.0 - rest * np.exp(-np.maximum(s - top, 0.0) / TAIL_SCALE)
        return np.where(s < self.scores[0], 0.0, np.where(s > top, beyond, inside))


@dataclass(frozen=True, slots=True)
class Feedback:
    """The label-feedback layer, fitted on reported outcomes of the training window."""

    window_days: float
    prior_strength: float
    base_rate: float
    # Isotonic map from the anomaly risk_score to the probability of fraud: piecewise linear knots.
    curve_x: npt.NDArray[np.float64]
    curve_y: npt.NDArray[np.float64]
    calibration: Calibration
    # Log-odds added per unit of anomaly risk (0 in models stored before it; see ``combined``).
    tie_break: float

    def fraud_probability(self, anomaly_risk: float) -> float:
        return float(np.interp(anomaly_risk, self.curve_x, self.curve_y))

    def terminal_rate(self, fraud_customers: int, customers: int) -> float:
        return (fraud_customers + self.prior_strength * self.base_rate) / (customers + self.prior_strength)

    def evidence(self, fraud_customers: int, customers: int) -> float:
        """Log-odds the terminal adds: only ever upwards, a clean terminal says little about a transaction."""
        if fraud_customers <= 0:
            return 0.0
        return max(0.0, logit(self.terminal_rate(fraud_customers, customers)) - logit(self.base_rate))

    def combined(self, anomaly_risk: float, evidence: float) -> float:
        """The fraud log-odds, with the anomaly risk as a tie-breaker.

        The isotonic curve is flat over wide stretches of anomaly risk and most places carry no evidence, so
        without the tie-breaker most of the traffic shares a handful of values, and which of them fall inside
        an alert budget depends on arrival order. ``tie_break * anomaly_risk`` (at most ``tie_break``
        log-odds) orders what the curve and the evidence leave tied, and reorders nothing they separate by
        more.
        """
        return logit(self.fraud_probability(anomaly_risk)) + evidence + self.tie_break * anomaly_risk


def _forest_scores(forest: CompiledForest, X: npt.NDArray[np.float64]) -> list[float]:  # noqa: N803
    """``forest.score_samples(X)``; a few rows one by one, where the batch walk costs more than it saves."""
    if len(X) < _BATCH_WALK_MIN_ROWS:
        return [forest.score_one(row) for row in X]
    return [float(value) for value in forest.score_samples(X)]


@dataclass(frozen=True, slots=True)
class Score:
    raw: float
    anomaly_risk: float
    risk_score: float
    used_customer_model: bool
    evidence: float


@dataclass(frozen=True, slots=True)
class GlobalModel:
    """The population model: global forest, combination rule, calibration, feature quantiles, feedback."""

    forest: CompiledForest
    calibration: Calibration
    # Per feature, the values at 0%, 0.1%, ..., 100% of training rows: how unusual a value is, for reasons.
    feature_quantiles: npt.NDArray[np.float64]
    combine_n0: float
    customer_min_history: int
    feedback: Feedback | None
    meta: dict[str, Any]

    def anomaly(self, x: npt.NDArray[np.float64], customer: CompiledForest | None, history: int) -> float:
        s_global = -self.forest.score_one(x)
        if customer is None:
            return s_global
        weight = history / (history + self.combine_n0)
        return weight * -customer.score_one(x) + (1.0 - weight) * s_global

    def score(
        self,
        x: npt.NDArray[np.float64],
        customer: CompiledForest | None,
        history: int,
        terminal: tuple[int, int] | None = None,
    ) -> Score:
        """Score one feature vector; ``terminal`` is (customers with reported fraud, customers) there."""
        raw = self.anomaly(x, customer, history)
        anomaly_risk = self.calibration(raw)
        if self.feedback is None:
            return Score(raw, anomaly_risk, anomaly_risk, customer is not None, 0.0)
        evidence = self.feedback.evidence(*terminal) if terminal is not None else 0.0
        combined = self.feedback.combined(anomaly_risk, evidence)
        return Score(raw, anomaly_risk, self.feedback.calibration(combined), customer is not None, evidence)

    def score_many(
        self,
        X: npt.NDArray[np.float64],  # noqa: N803 - a matrix, as in scikit-learn
        customers: Sequence[CompiledForest | None],
        histories: Sequence[int],
        terminals: Sequence[tuple[int, int] | None],
    ) -> list[Score]:
        """:meth:`score` of each row of ``X`` (with its customer's forest, history and terminal), at once.

        The same arithmetic in the same order as :meth:`score` row by row, so the same bits: forests score
        the rows a forest at a time (``score_samples`` equals ``score_one``), the rest is elementwise.
        """
        raw = [-float(value) for value in _forest_scores(self.forest, X)]
        by_forest: dict[int, list[int]] = {}
        for row, forest in enumerate(customers):
            if forest is not None:
                by_forest.setdefault(id(forest), []).append(row)
        for rows in by_forest.values():
            forest = customers[rows[0]]
            assert forest is not None
            for row, mine in zip(rows, _forest_scores(forest, X[rows]), strict=True):
                weight = histories[row] / (histories[row] + self.combine_n0)
                raw[row] = weight * -mine + (1.0 - weight) * raw[row]
        anomaly_risk = self.calibration.many(raw)
        if self.feedback is None:
            return [
                Score(r, float(a), float(a), customer is not None, 0.0)
                for r, a, customer in zip(raw, anomaly_risk, customers, strict=True)
            ]
        fb = self.feedback
        evidence = [fb.evidence(*terminal) if terminal is not None else 0.0 for terminal in terminals]
        fraud = np.interp(anomaly_risk, fb.curve_x, fb.curve_y)
        combined = [
            logit(float(p)) + e + fb.tie_break * float(a)
            for p, e, a in zip(fraud, evidence, anomaly_risk, strict=True)
        ]
        risk = fb.calibration.many(combined)
        return [
            Score(r, float(a), float(k), customer is not None, e)
            for r, a, k, customer, e in zip(raw, anomaly_risk, risk, customers, evidence, strict=True)
        ]

    def risk_many(
        self, raw: npt.NDArray[np.float64], evidence: npt.NDArray[np.float64] | None = None
    ) -> npt.NDArray[np.float64]:
        """``risk_score`` of many blended anomaly scores at once (offline evaluation), as :meth:`score` does.

        ``evidence`` is the label-feedback log-odds of each row's place (0 where None).
        """
        anomaly_risk = self.calibration.many(raw)
        if self.feedback is None:
            return anomaly_risk
        fb = self.feedback
        p = np.clip(np.interp(anomaly_risk, fb.curve_x, fb.curve_y), _EPS, 1.0 - _EPS)
        combined = np.log(p / (1.0 - p))
        if evidence is not None:
            combined = combined + evidence
        return fb.calibration.many(combined + fb.tie_break * anomaly_risk)

    def rarity(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Per feature, the fraction of training rows with a value at least this high (small = unusual)."""
        rarity: npt.NDArray[np.float64] = self.rarity_many(x[np.newaxis, :])[0]
        return rarity

    def rarity_many(self, X: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:  # noqa: N803
        """:meth:`rarity` of each row of ``X``."""
        out = np.empty((X.shape[0], len(FEATURES)))
        grid = np.linspace(0.0, 1.0, self.feature_quantiles.shape[1])
        beyond = 0.5 / self.meta.get("sample_count", 1000)
        for i, column in enumerate(self.feature_quantiles):
            values = X[:, i]
            inside = 1.0 - np.interp(values, column, grid)
            out[:, i] = np.where(values <= column[0], 1.0, np.where(values > column[-1], beyond, inside))
        return out

    # -- artifact -------------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        meta = dict(self.meta)
        meta.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            features=list(FEATURES),
            feature_version=FEATURE_VERSION,
            combine_n0=self.combine_n0,
            customer_min_history=self.customer_min_history,
        )
        arrays: dict[str, npt.NDArray[Any]] = {
            "forest": np.frombuffer(self.forest.to_bytes(), dtype=np.uint8),
            "calibration_scores": self.calibration.scores,
            "calibration_fractions": self.calibration.fractions,
            "feature_quantiles": self.feature_quantiles,
        }
        if self.feedback is not None:
            fb = self.feedback
            meta["feedback"] = {
                "window_days": fb.window_days,
                "prior_strength": fb.prior_strength,
                "base_rate": fb.base_rate,
                "tie_break": fb.tie_break,
            }
            arrays.update(
                feedback_curve_x=fb.curve_x,
                feedback_curve_y=fb.curve_y,
                feedback_calibration_scores=fb.calibration.scores,
                feedback_calibration_fractions=fb.calibration.fractions,
            )
        arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> GlobalModel:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
            meta = json.loads(arrays["meta"].tobytes().decode())
            if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
                raise ValueError("not a posguard global risk model of a known version")
            if meta.get("feature_version") != FEATURE_VERSION or meta.get("features") != list(FEATURES):
                raise ValueError("trained on other feature definitions than this server computes")
            forest = CompiledForest.from_bytes(arrays["forest"].tobytes())
            if forest.n_features != len(FEATURES):
                raise ValueError("forest does not match the feature vector")
            feedback = None
            if "feedback" in meta:
                fb = meta["feedback"]
                feedback = Feedback(
                    window_days=float(fb["window_days"]),
                    prior_strength=float(fb["prior_strength"]),
                    base_rate=float(fb["base_rate"]),
                    curve_x=_floats(arrays["feedback_curve_x"]),
                    curve_y=_floats(arrays["feedback_curve_y"]),
                    calibration=_calibration(
                        arrays["feedback_calibration_scores"], arrays["feedback_calibration_fractions"]
                    ),
                    # Models stored before the tie-breaker was fitted with none: they keep scoring as fitted.
                    tie_break=float(fb.get("tie_break", 0.0)),
                )
            quantiles = _floats(arrays["feature_quantiles"])
            if quantiles.ndim != 2 or quantiles.shape[0] != len(FEATURES):
                raise ValueError("feature quantiles have the wrong shape")
            return cls(
                forest=forest,
                calibration=_calibration(arrays["calibration_scores"], arrays["calibration_fractions"]),
                feature_quantiles=quantiles,
                combine_n0=float(meta["combine_n0"]),
                customer_min_history=int(meta["customer_min_history"]),
                feedback=feedback,
                meta=meta,
            )
        except (KeyError, TypeError, ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"invalid global risk model: {error}") from error


def _floats(array: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    if array.dtype != np.float64 or not np.all(np.isfinite(array)):
        raise ValueError("expected finite float64 values")
    return array


def _calibration(scores: npt.NDArray[Any], fractions: npt.NDArray[Any]) -> Calibration:
    s, f = _floats(scores), _floats(fractions)
    if s.ndim != 1 or s.shape != f.shape or len(s) == 0 or np.any(np.diff(s) <= 0) or np.any(np.diff(f) < 0):
        raise ValueError("calibration knots must be increasing")
    return Calibration(s, f)
