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
   With **group forests** (models of feature version 2), the core's calibrated tail probability ``p`` (the
   share of training transactions scoring at least as high) is the statistic ``-ln p``, and each global group
   forest (``FEATURE_GROUPS``: time of day, place) adds ``GROUP_WEIGHT * (-ln p_g - ln 10)`` when its own tail
   probability ``p_g`` is below 10%; the statistic is then calibrated as above. The core decides; a group
   speaks only from the far end of its own view, so it cannot drown the core in its ordinary traffic, and a
   core that sees nothing cannot hide a group that sees a lot.
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
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from posguard_models.features import CORE_FEATURES, FEATURE_GROUPS, FEATURE_VERSION, FEATURES
from posguard_models.forest import CompiledForest, StackedForests

FORMAT: Final = "posguard.global-risk-model"
# Version 2 adds the group forests; version 1 (core forests only, feature version 1) is still read and served
# on the core columns until a retrain replaces it.
FORMAT_VERSION: Final = 2
_CORE_ONLY_VERSION: Final = 1
_CORE_ONLY_FEATURE_VERSION: Final = 1
CORE: Final = len(CORE_FEATURES)
# A group adds GROUP_WEIGHT log-units of surprise per log-unit its tail probability lies below GROUP_TAIL.
# Measured (docs/risk-model.md): 0.2 and 10% gain AP on both development files without moving ROC-AUC; taking
# the most surprising group instead (Sidak) lost on both.
GROUP_WEIGHT: Final = 0.2
GROUP_TAIL: Final = 0.1
# Tail probabilities are floored here before their logarithm (the calibration's tail decays towards 0).
_P_FLOOR: Final = 1e-12
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


def interp_rows(
    values: npt.NDArray[np.float64], xp: npt.NDArray[np.float64], fp: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """``np.interp(values[:, i], xp[i], fp)`` for every column ``i`` at once, bit for bit.

    For a few rows: ``np.interp`` costs a call per column, this a dozen calls whatever the number of columns
    (its comparisons grow with rows x columns x points, so many rows are cheaper a column at a time). Each
    ``xp[i]`` is ascending, ties allowed. The steps are numpy's own (``arr_interp``): the last point at or
    below the value, that point's ``fp`` on an exact hit or at the top, else ``slope * (x - x_j) + f_j``,
    retried from the right end when that is NaN; NaN in, NaN out.
    """
    points = xp.shape[1]
    at_or_below = (xp[np.newaxis, :, :] <= values[:, :, np.newaxis]).sum(axis=2) - 1
    j = np.clip(at_or_below, 0, points - 2)
    column = np.arange(xp.shape[0])
    x0, x1, f0, f1 = xp[column, j], xp[column, j + 1], fp[j], fp[j + 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (f1 - f0) / (x1 - x0)
        result = slope * (values - x0) + f0
        retry = np.isnan(result)
        if retry.any():
            again = slope * (values - x1) + f1
            again = np.where(np.isnan(again) & (f0 == f1), f0, again)
            result = np.where(retry, again, result)
    result = np.where(values == x0, f0, result)
    result = np.where(at_or_below == points - 1, fp[-1], result)
    answer: npt.NDArray[np.float64] = np.where(
        at_or_below < 0, np.where(np.isnan(values), np.nan, fp[0]), result
    )
    return answer


def surprise(fractions: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``-ln p`` of calibrated fractions; ``p = 1 - fraction``, the share of training scoring as high."""
    result: npt.NDArray[np.float64] = -np.log(np.maximum(1.0 - fractions, _P_FLOOR))
    return result


@dataclass(frozen=True, slots=True)
class GroupForest:
    """A global forest over one feature group and the calibration of its scores on the training rows."""

    name: str
    columns: tuple[int, ...]  # positions in FEATURES
    forest: CompiledForest
    calibration: Calibration

    def terms(self, X: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:  # noqa: N803
        """What the group adds to the statistic of each row: 0 unless its tail probability is below 10%."""
        return self.terms_of(_forest_scores(self.forest, X[:, self.columns]))

    def terms_of(self, scores: Sequence[float]) -> npt.NDArray[np.float64]:
        """``terms`` of rows whose forest scores (``score_samples``) are ``scores``."""
        raw = -np.array(scores, dtype=np.float64)
        excess = surprise(self.calibration.many(raw)) + math.log(GROUP_TAIL)
        result: npt.NDArray[np.float64] = GROUP_WEIGHT * np.maximum(excess, 0.0)
        return result


def statistic(
    raw: npt.NDArray[np.float64] | Sequence[float],
    X: npt.NDArray[np.float64],  # noqa: N803
    groups: Sequence[GroupForest],
    core_calibration: Calibration | None,
    group_scores: Sequence[Sequence[float]] | None = None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per row, the core's surprise plus what each group adds, and those additions (rows x groups).

    Without groups (a model of format 1) the statistic is the blended core score ``raw`` itself.
    ``group_scores``: each group forest's scores of the rows, when already computed.
    """
    core = np.asarray(raw, dtype=np.float64)
    if not groups or core_calibration is None:
        return core, np.zeros((len(core), 0))
    if group_scores is None:
        terms = np.column_stack([group.terms(X) for group in groups])
    else:
        terms = np.column_stack([g.terms_of(s) for g, s in zip(groups, group_scores, strict=True)])
    return surprise(core_calibration.many(core)) + terms.sum(axis=1), terms


def group_columns() -> list[tuple[str, tuple[int, ...]]]:
    """Each group of FEATURE_GROUPS with the positions of its features."""
    return [(name, tuple(FEATURES.index(f) for f in names)) for name, names in FEATURE_GROUPS]


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
    # What each group forest added to the statistic, by group name (only groups that added something).
    groups: tuple[tuple[str, float], ...] = ()


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
    # With group forests: the calibration of the blended core score, and the groups; ``calibration`` then
    # maps the combined statistic. Empty for models of format 1, which score on the core alone.
    groups: tuple[GroupForest, ...] = ()
    core_calibration: Calibration | None = None
    # The core and group forests walked together on a row (``_global_scores``); made from the fields above.
    _walker: StackedForests = field(init=False, repr=False, compare=False)
    # The quantile levels of ``feature_quantiles``' columns (0, 0.1%, ..., 100%).
    _grid: npt.NDArray[np.float64] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        stacked = [(self.forest, range(CORE)), *((g.forest, g.columns) for g in self.groups)]
        object.__setattr__(self, "_walker", StackedForests(stacked))
        object.__setattr__(self, "_grid", np.linspace(0.0, 1.0, self.feature_quantiles.shape[1]))

    def anomaly(self, x: npt.NDArray[np.float64], customer: CompiledForest | None, history: int) -> float:
        """The blended core score (customer and global forests over the core features)."""
        core = x[:CORE]
        s_global = -self.forest.score_one(core)
        if customer is None:
            return s_global
        weight = history / (history + self.combine_n0)
        return weight * -customer.score_one(core) + (1.0 - weight) * s_global

    def statistic_many(
        self,
        raw: npt.NDArray[np.float64] | Sequence[float],
        X: npt.NDArray[np.float64],  # noqa: N803
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """The statistic ``calibration`` maps, per row, and what each group added (rows x groups).

        Without groups the statistic is the blended core score itself.
        """
        return statistic(raw, X, self.groups, self.core_calibration)

    def _global_scores(self, X: npt.NDArray[np.float64]) -> tuple[list[float], list[list[float]] | None]:  # noqa: N803
        """The core forest's scores of the rows, and each group forest's (None without groups).

        A few rows are walked through every forest at once (``StackedForests``); more, forest by forest.
        """
        if self.groups and len(X) < _BATCH_WALK_MIN_ROWS:
            walked = [self._walker.score_one(x) for x in X]
            return [scores[0] for scores in walked], [
                [scores[k] for scores in walked] for k in range(1, len(self.groups) + 1)
            ]
        global_scores = _forest_scores(self.forest, X[:, :CORE])
        if not self.groups:
            return global_scores, None
        return global_scores, [_forest_scores(g.forest, X[:, g.columns]) for g in self.groups]

    def _group_terms(self, terms: npt.NDArray[np.float64]) -> tuple[tuple[str, float], ...]:
        return tuple(
            (group.name, float(term)) for group, term in zip(self.groups, terms, strict=True) if term > 0
        )

    def score(
        self,
        x: npt.NDArray[np.float64],
        customer: CompiledForest | None,
        history: int,
        terminal: tuple[int, int] | None = None,
    ) -> Score:
        """Score one feature vector; ``terminal`` is (customers with reported fraud, customers) there."""
        raw = self.anomaly(x, customer, history)
        # The batch arithmetic on one row, so that score and score_many give the same bits.
        statistic, terms = self.statistic_many([raw], x[np.newaxis, :])
        groups = self._group_terms(terms[0])
        anomaly_risk = float(self.calibration.many(statistic)[0])
        if self.feedback is None:
            return Score(raw, anomaly_risk, anomaly_risk, customer is not None, 0.0, groups)
        evidence = self.feedback.evidence(*terminal) if terminal is not None else 0.0
        combined = self.feedback.combined(anomaly_risk, evidence)
        risk = self.feedback.calibration(combined)
        return Score(raw, anomaly_risk, risk, customer is not None, evidence, groups)

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
        core = X[:, :CORE]
        global_scores, group_scores = self._global_scores(X)
        raw = [-value for value in global_scores]
        by_forest: dict[int, list[int]] = {}
        for row, forest in enumerate(customers):
            if forest is not None:
                by_forest.setdefault(id(forest), []).append(row)
        for rows in by_forest.values():
            forest = customers[rows[0]]
            assert forest is not None
            for row, mine in zip(rows, _forest_scores(forest, core[rows]), strict=True):
                weight = histories[row] / (histories[row] + self.combine_n0)
                raw[row] = weight * -mine + (1.0 - weight) * raw[row]
        statistic_, terms = statistic(raw, X, self.groups, self.core_calibration, group_scores)
        groups = [self._group_terms(row) for row in terms]
        anomaly_risk = self.calibration.many(statistic_)
        if self.feedback is None:
            return [
                Score(r, float(a), float(a), customer is not None, 0.0, g)
                for r, a, customer, g in zip(raw, anomaly_risk, customers, groups, strict=True)
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
            Score(r, float(a), float(k), customer is not None, e, g)
            for r, a, k, customer, e, g in zip(
                raw, anomaly_risk, risk, customers, evidence, groups, strict=True
            )
        ]

    def risk_many(
        self,
        raw: npt.NDArray[np.float64],
        X: npt.NDArray[np.float64],  # noqa: N803
        evidence: npt.NDArray[np.float64] | None = None,
    ) -> npt.NDArray[np.float64]:
        """``risk_score`` of many blended core scores at once (offline evaluation), as :meth:`score` does.

        ``X`` holds the rows' feature vectors (for the group forests); ``evidence`` is the label-feedback
        log-odds of each row's place (0 where None).
        """
        anomaly_risk = self.calibration.many(self.statistic_many(raw, X)[0])
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

    def share_at_or_above(self, index: int, value: float) -> float:
        """The share of training rows with feature ``index`` at least ``value``, ties included.

        For a feature of few values (``new_place`` is 0 or 1) :meth:`rarity` reads a tie at the top as the top
        quantile; this counts the whole tie. 0.5 / n beyond the training maximum, 1 without quantiles.
        """
        if index >= len(self.feature_quantiles):
            return 1.0
        column = self.feature_quantiles[index]
        if value > column[-1]:
            return 0.5 / float(self.meta.get("sample_count", 1000))
        below = np.searchsorted(column, value, side="left")
        return 1.0 - float(below) / (len(column) - 1) if below else 1.0

    def rarity_many(self, X: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:  # noqa: N803
        """:meth:`rarity` of each row of ``X``."""
        quantiles = self.feature_quantiles
        # A model of format 1 knows the core features only: the others are never rare under it.
        out = np.ones((X.shape[0], len(FEATURES)))
        values = X[:, : len(quantiles)]
        if len(X) < _BATCH_WALK_MIN_ROWS:
            below = interp_rows(values, quantiles, self._grid)
        else:
            below = np.column_stack([np.interp(values[:, i], q, self._grid) for i, q in enumerate(quantiles)])
        beyond = 0.5 / self.meta.get("sample_count", 1000)
        out[:, : len(quantiles)] = np.where(
            values <= quantiles[:, 0], 1.0, np.where(values > quantiles[:, -1], beyond, 1.0 - below)
        )
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
        if self.groups and self.core_calibration is not None:
            meta["groups"] = [
                {"name": g.name, "features": [FEATURES[i] for i in g.columns]} for g in self.groups
            ]
            meta["group_weight"], meta["group_tail"] = GROUP_WEIGHT, GROUP_TAIL
            arrays["core_calibration_scores"] = self.core_calibration.scores
            arrays["core_calibration_fractions"] = self.core_calibration.fractions
            for i, group in enumerate(self.groups):
                arrays[f"group_{i}_forest"] = np.frombuffer(group.forest.to_bytes(), dtype=np.uint8)
                arrays[f"group_{i}_calibration_scores"] = group.calibration.scores
                arrays[f"group_{i}_calibration_fractions"] = group.calibration.fractions
        elif len(self.feature_quantiles) == CORE:
            # A format 1 model read and stored again (a backup, a copy between registries) stays format 1.
            meta.update(
                format_version=_CORE_ONLY_VERSION,
                features=list(CORE_FEATURES),
                feature_version=_CORE_ONLY_FEATURE_VERSION,
            )
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
            version = meta.get("format_version")
            if meta.get("format") != FORMAT or version not in (_CORE_ONLY_VERSION, FORMAT_VERSION):
                raise ValueError("not a posguard global risk model of a known version")
            # Format 1 was trained on the four core features of feature version 1, unchanged since: it is
            # served on them, without groups, until a retrain replaces it.
            features, feature_version = (
                (CORE_FEATURES, _CORE_ONLY_FEATURE_VERSION)
                if version == _CORE_ONLY_VERSION
                else (FEATURES, FEATURE_VERSION)
            )
            if meta.get("feature_version") != feature_version or meta.get("features") != list(features):
                raise ValueError("trained on other feature definitions than this server computes")
            forest = CompiledForest.from_bytes(arrays["forest"].tobytes())
            if forest.n_features != CORE:
                raise ValueError("forest does not match the feature vector")
            groups, core_calibration = _groups(meta, arrays) if version == FORMAT_VERSION else ((), None)
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
            if quantiles.ndim != 2 or quantiles.shape[0] != len(features):
                raise ValueError("feature quantiles have the wrong shape")
            return cls(
                forest=forest,
                calibration=_calibration(arrays["calibration_scores"], arrays["calibration_fractions"]),
                feature_quantiles=quantiles,
                combine_n0=float(meta["combine_n0"]),
                customer_min_history=int(meta["customer_min_history"]),
                feedback=feedback,
                meta=meta,
                groups=groups,
                core_calibration=core_calibration,
            )
        except (KeyError, TypeError, ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"invalid global risk model: {error}") from error


def _groups(
    meta: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]
) -> tuple[tuple[GroupForest, ...], Calibration]:
    """The group forests of a format 2 artifact; they must be this version's groups, in its order."""
    stored = [(g["name"], tuple(FEATURES.index(f) for f in g["features"])) for g in meta["groups"]]
    if stored != group_columns():
        raise ValueError("trained on other feature groups than this server computes")
    if meta.get("group_weight") != GROUP_WEIGHT or meta.get("group_tail") != GROUP_TAIL:
        raise ValueError("combines its groups otherwise than this server does")
    groups = []
    for i, (name, columns) in enumerate(stored):
        forest = CompiledForest.from_bytes(arrays[f"group_{i}_forest"].tobytes())
        if forest.n_features != len(columns):
            raise ValueError(f"group forest {name} does not match its features")
        prefix = f"group_{i}_calibration"
        calibration = _calibration(arrays[f"{prefix}_scores"], arrays[f"{prefix}_fractions"])
        groups.append(GroupForest(name, columns, forest, calibration))
    core = _calibration(arrays["core_calibration_scores"], arrays["core_calibration_fractions"])
    return tuple(groups), core


def _floats(array: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    if array.dtype != np.float64 or not np.all(np.isfinite(array)):
        raise ValueError("expected finite float64 values")
    return array


def _calibration(scores: npt.NDArray[Any], fractions: npt.NDArray[Any]) -> Calibration:
    s, f = _floats(scores), _floats(fractions)
    if s.ndim != 1 or s.shape != f.shape or len(s) == 0 or np.any(np.diff(s) <= 0) or np.any(np.diff(f) < 0):
        raise ValueError("calibration knots must be increasing")
    return Calibration(s, f)
