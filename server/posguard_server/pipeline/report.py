"""The evaluation report of a retraining run: one HTML page and its PNG plots, readable without Python.

The data team decides from this page whether a candidate model set may replace the active one, so it puts
both sets side by side on the same evaluation rows: score distributions, ROC and precision-recall curves,
alert rate by threshold, a table of metrics with the difference candidate − active and, when the candidate
already runs in shadow, how it scored live traffic next to the active models.

The page is self-contained: inline CSS, no JavaScript, no network resource, and the plots referenced by
relative file name in the same folder, so the folder can be copied, archived or attached to a ticket.
Plots use matplotlib's object-oriented API on the Agg canvas only (no pyplot and no rcParams changes), so a
report can be written from any thread of a headless process. File names are fixed, so a folder per run
always has the same layout and a later report in the same folder replaces every plot of an earlier one.

``risk_score`` is calibrated so that ``1 - risk_score`` reads as an alert rate on normal traffic; thresholds
live in the upper tail (0.99, 0.999, ...), so tail plots use a log scale in ``1 - risk_score``.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from scipy.stats import spearmanr
from sklearn.metrics import precision_recall_curve, roc_curve

from posguard_models.evaluation import ALERT_RATE, Detection, detection

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

HTML_NAME = "index.html"
DISTRIBUTION_PNG = "score_distribution.png"
ROC_PNG = "roc.png"
PRECISION_RECALL_PNG = "precision_recall.png"
ALERT_RATE_PNG = "alert_rate.png"
SHADOW_PNG = "shadow.png"
ALL_PNGS = (DISTRIBUTION_PNG, ROC_PNG, PRECISION_RECALL_PNG, ALERT_RATE_PNG, SHADOW_PNG)

DPI = 100
# Inches at DPI: every plot keeps its pixel size whatever the data, so pages and archives stay comparable.
_SIZES: dict[str, tuple[float, float]] = {
    DISTRIBUTION_PNG: (12.0, 4.5),
    ROC_PNG: (12.0, 5.0),
    PRECISION_RECALL_PNG: (7.0, 5.0),
    ALERT_RATE_PNG: (12.0, 4.5),
    SHADOW_PNG: (15.0, 4.5),
}
# Finest alert rate the tail axes show (at least one decade below the decline threshold's).
_TAIL_FLOOR = 1e-4
_MIN_TAIL_FLOOR = 1e-7
_GRID_POINTS = 121
# Figure margins and the gap between panels, in inches (room for tick labels, axis labels and titles).
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_BOTTOM, _MARGIN_TOP, _GAP = 0.8, 0.25, 0.6, 0.4, 0.9
_HIST_BINS = 50
_LOG_COUNT_FLOOR = 0.7  # bottom of log count axes: a bin with one row still shows as a step

_EVALUATED_COLOUR = "tab:orange"
_COLOURS = {"active": "tab:blue", "candidate": _EVALUATED_COLOUR, "shadow": "tab:green"}
_FALLBACK_COLOURS = ("tab:purple", "tab:brown", "tab:pink")
_REVIEW_COLOUR = "goldenrod"
_DECLINE_COLOUR = "firebrick"
_DECISIONS = ("APPROVE", "REVIEW", "DECLINE")
# Threshold dots, in points. The unit axes (ROC, precision-recall) reach this far past 0 and 1, as a share of
# the range, so a dot at 0 or 1 (no false positive, nothing caught) shows whole, not halved by the spine.
_DOT_SIZE = 6.0
_UNIT_LIMITS = (-0.02, 1.02)
_LegendPlace = Literal[
    "upper right",
    "lower right",
    "lower left",
    "upper left",
    "center right",
    "center left",
    "upper center",
    "lower center",
]
# Where a legend may go, in order of preference; the first that covers no threshold dot is taken.
_LEGEND_PLACES: tuple[_LegendPlace, ...] = get_args(_LegendPlace)


class Standing(Enum):
    """Where the evaluated models stand, which the page's wording follows: a run that was promoted, put
    in shadow or rolled back is not "the candidate". Values are the label of its column and plot lines."""

    CANDIDATE = "candidate"  # registered, answering nothing: compared with the active models
    SERVED = "served"  # the models that answered the traffic evaluated (the demo's day)
    ACTIVE = "promoted"  # a promoted run, serving now
    SHADOW = "shadow"  # scored next to the active models, answering nothing
    ROLLED_BACK = "rolled back"  # was active, rolled back to the models it had replaced
    RETIRED = "retired"  # was active, replaced by a later run


@dataclass(frozen=True, slots=True)
class ScoredSet:
    label: str  # e.g. "active" or "candidate"
    version: str  # registry version; "" when nothing is active
    risk: FloatArray  # risk_score in [0, 1], one per evaluation row (same rows for every set)


@dataclass(frozen=True, slots=True)
class ShadowScores:
    """Live traffic the servers scored with both the active models and the shadow candidate."""

    version: str
    active_risk: FloatArray
    shadow_risk: FloatArray
    fraud: BoolArray  # reported fraud/chargeback so far


@dataclass(frozen=True, slots=True)
class ReportInput:
    title: str
    generated_at: datetime
    window_start: datetime | None  # event-time window of the evaluation rows
    window_end: datetime | None
    fraud: BoolArray  # label per evaluation row: True = reported fraud or chargeback
    candidate: ScoredSet
    active: ScoredSet | None  # None: nothing was active (first training)
    review_threshold: float  # the server's REVIEW / DECLINE thresholds, marked on plots and in the table
    decline_threshold: float
    summary: Sequence[tuple[str, str]] = ()  # run facts shown as a table
    shadow: ShadowScores | None = None
    standing: Standing = Standing.CANDIDATE  # what the ``candidate`` set is: the page names it so
    standing_since: datetime | None = None  # when it took that standing (promoted, rolled back, ...)


@dataclass(frozen=True, slots=True)
class ReportFiles:
    html: Path
    images: tuple[Path, ...]


@dataclass(frozen=True, slots=True)
class _Operating:
    """What one threshold does to one set: the share of rows it alerts on, the share of fraud it catches."""

    alert_rate: float
    recall: float | None  # None without any fraud label


@dataclass(frozen=True, slots=True)
class _SetMetrics:
    rows: int
    frauds: int
    detection: Detection | None  # None unless both fraud and genuine rows exist
    review: _Operating
    decline: _Operating


@dataclass(frozen=True, slots=True)
class _MetricRow:
    """One line of a metrics table: how to read the value, how to show it and how to show a difference."""

    name: str
    value: Callable[[_SetMetrics], float | None]
    show: Callable[[float], str]
    show_difference: Callable[[float], str] | None  # None: a difference means nothing (same rows)


# ----------------------------------------------------------------------------------------------- entry point


def write_report(data: ReportInput, directory: Path) -> ReportFiles:
    """Write ``index.html`` and its plots into ``directory`` (created if needed) and return their paths.

    The page is written last, through a temporary file, so a folder with an ``index.html`` always holds a
    complete report. Plots an earlier report left in the folder that this one does not draw are removed:
    the folder never shows a stale ROC curve next to a page that says there is none.
    """
    _validate(data)
    directory.mkdir(parents=True, exist_ok=True)
    sets = _scored_sets(data)
    thresholds = (data.review_threshold, data.decline_threshold)
    images = [
        _save(_distribution_figure(sets, data.fraud, thresholds), directory / DISTRIBUTION_PNG),
        _save(_alert_rate_figure(sets, data.fraud, thresholds), directory / ALERT_RATE_PNG),
    ]
    if _labelled(data.fraud):
        images.append(_save(_roc_figure(sets, data.fraud, thresholds), directory / ROC_PNG))
        images.append(
            _save(_precision_recall_figure(sets, data.fraud, thresholds), directory / PRECISION_RECALL_PNG)
        )
    if data.shadow is not None and len(data.shadow.active_risk) > 0:
        images.append(_save(_shadow_figure(data.shadow, thresholds), directory / SHADOW_PNG))
    written = {image.name for image in images}
    for name in ALL_PNGS:
        if name not in written:
            (directory / name).unlink(missing_ok=True)
    page = directory / HTML_NAME
    _write_text_atomically(page, _page(data, sets, written))
    return ReportFiles(html=page, images=tuple(images))


# ------------------------------------------------------------------------------------------------ validation


def _validate(data: ReportInput) -> None:
    """Refuse inputs that would give a misleading page (a clear error beats a blank or wrong plot)."""
    rows = len(data.fraud)
    if rows == 0:
        raise ValueError("the evaluation set is empty: there is nothing to report on")
    _check_labels("fraud", data.fraud)
    sets = [data.candidate] if data.active is None else [data.active, data.candidate]
    for scored in sets:
        _check_risk(f"{scored.label} risk", scored.risk, rows)
    if data.active is not None and data.active.label == data.candidate.label:
        raise ValueError(f"the active and candidate sets share the label {data.candidate.label!r}")
    if not 0.0 < data.review_threshold <= data.decline_threshold <= 1.0:
        raise ValueError(
            f"thresholds must satisfy 0 < review <= decline <= 1, "
            f"got review={data.review_threshold} decline={data.decline_threshold}"
        )
    if data.shadow is not None:
        live = len(data.shadow.fraud)
        _check_labels("shadow fraud", data.shadow.fraud)
        _check_risk("shadow active risk", data.shadow.active_risk, live)
        _check_risk("shadow risk", data.shadow.shadow_risk, live)


def _check_labels(name: str, labels: BoolArray) -> None:
    if labels.ndim != 1 or labels.dtype != np.bool_:
        raise ValueError(f"{name} must be a one-dimensional boolean array, got {labels.dtype} {labels.shape}")


def _check_risk(name: str, risk: FloatArray, rows: int) -> None:
    if risk.ndim != 1 or len(risk) != rows:
        raise ValueError(f"{name} must have one score per row ({rows}), got shape {risk.shape}")
    if rows and not (np.isfinite(risk).all() and risk.min() >= 0.0 and risk.max() <= 1.0):
        raise ValueError(f"{name} must be finite risk scores in [0, 1]")


def _scored_sets(data: ReportInput) -> list[ScoredSet]:
    """Active first, so every plot and table reads "before → after" from left to right."""
    risk = np.asarray(data.candidate.risk, dtype=np.float64)
    candidate = ScoredSet(data.candidate.label, data.candidate.version, risk)
    if data.active is None:
        return [candidate]
    return [
        ScoredSet(data.active.label, data.active.version, np.asarray(data.active.risk, np.float64)),
        candidate,
    ]


def _labelled(fraud: BoolArray) -> bool:
    """Ranking metrics need both classes: without fraud there is nothing to find, without genuine rows no
    false alarm to count."""
    return bool(fraud.any()) and not bool(fraud.all())


# --------------------------------------------------------------------------------------------------- metrics


def _alert_rate(risk: FloatArray, threshold: float) -> float:
    """Share of rows the server would at least REVIEW at this threshold (``risk_score >= threshold``)."""
    return float(np.mean(risk >= threshold)) if len(risk) else 0.0


def _recall(risk: FloatArray, fraud: BoolArray, threshold: float) -> float | None:
    frauds = int(fraud.sum())
    return float(np.sum(risk[fraud] >= threshold) / frauds) if frauds else None


def _set_metrics(risk: FloatArray, fraud: BoolArray, review: float, decline: float) -> _SetMetrics:
    return _SetMetrics(
        rows=len(risk),
        frauds=int(fraud.sum()),
        detection=detection(fraud, risk) if _labelled(fraud) else None,
        review=_Operating(_alert_rate(risk, review), _recall(risk, fraud, review)),
        decline=_Operating(_alert_rate(risk, decline), _recall(risk, fraud, decline)),
    )


def _metric_rows(review: float, decline: float) -> list[_MetricRow]:
    """The rows of the metrics table, shared by the evaluation and the shadow sections."""

    def ap(m: _SetMetrics) -> float | None:
        return None if m.detection is None else m.detection.average_precision

    def auc(m: _SetMetrics) -> float | None:
        return None if m.detection is None else m.detection.roc_auc

    def recall_budget(m: _SetMetrics) -> float | None:
        return None if m.detection is None else m.detection.recall_at_alert_rate

    r, d = _threshold_text(review), _threshold_text(decline)
    return [
        _MetricRow("rows", lambda m: m.rows, _count, None),
        _MetricRow("frauds", lambda m: m.frauds, _count, None),
        _MetricRow("average precision", ap, _decimal, _signed_decimal),
        _MetricRow("ROC-AUC", auc, _decimal, _signed_decimal),
        _MetricRow(f"recall at {ALERT_RATE:.0%} alert rate", recall_budget, _percent, _points),
        _MetricRow(f"alert rate at REVIEW (≥ {r})", lambda m: m.review.alert_rate, _percent, _points),
        _MetricRow(f"recall at REVIEW (≥ {r})", lambda m: m.review.recall, _percent, _points),
        _MetricRow(f"alert rate at DECLINE (≥ {d})", lambda m: m.decline.alert_rate, _percent, _points),
        _MetricRow(f"recall at DECLINE (≥ {d})", lambda m: m.decline.recall, _percent, _points),
    ]


def _decisions(risk: FloatArray, review: float, decline: float) -> npt.NDArray[np.int64]:
    """0 = APPROVE, 1 = REVIEW, 2 = DECLINE, as the server decides from the score alone."""
    return np.where(risk >= decline, 2, np.where(risk >= review, 1, 0)).astype(np.int64)


def _decision_changes(shadow: ShadowScores, review: float, decline: float) -> npt.NDArray[np.int64]:
    """3 × 3 counts: row = decision of the active models, column = decision of the shadow candidate."""
    before = _decisions(shadow.active_risk, review, decline)
    after = _decisions(shadow.shadow_risk, review, decline)
    return np.bincount(before * 3 + after, minlength=9).reshape(3, 3)


def _spearman(a: FloatArray, b: FloatArray) -> float | None:
    """Rank correlation of two scorings of the same rows; None when one of them ranks nothing (constant)."""
    if len(a) < 2 or np.ptp(a) == 0.0 or np.ptp(b) == 0.0:
        return None
    return float(spearmanr(a, b).statistic)


def _top_overlap(a: FloatArray, b: FloatArray, share: float) -> float:
    """Share of the top ``share`` rows by ``a`` that are also in the top by ``b``: agreement where alerts are,
    which a rank correlation over all rows (dominated by the unremarkable bulk) hides."""
    k = max(1, int(len(a) * share))
    top_a = np.argsort(-a, kind="stable")[:k]
    top_b = np.argsort(-b, kind="stable")[:k]
    return float(len(np.intersect1d(top_a, top_b)) / k)


# ------------------------------------------------------------------------------------------------ formatting


def _count(value: float) -> str:
    return f"{int(value):,}"


def _decimal(value: float) -> str:
    """AP and ROC-AUC: four decimals, the precision a promotion decision is argued at."""
    return f"{value:.4f}"


def _signed_decimal(value: float) -> str:
    return f"{value:+.4f}"


def _percent(value: float) -> str:
    return f"{value:.2%}"


def _points(value: float) -> str:
    """A difference of two rates, in percentage points (a relative change would mislead on small rates)."""
    return f"{100 * value:+.2f} pp"


def _threshold_text(threshold: float) -> str:
    return f"{threshold:g}"


def _version_text(version: str) -> str:
    return version if version else "(none)"


def _moment(moment: datetime | None) -> str:
    return "not given" if moment is None else moment.isoformat(sep=" ", timespec="seconds")


def _day(moment: datetime) -> str:
    """A date and minute in UTC, as a standing's "since" reads in a sentence."""
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def _evaluated(data: ReportInput) -> str:
    """What the evaluated set is, as a phrase: "candidate run V", "run V (rolled back on DATE)", ..."""
    version = _version_text(data.candidate.version)
    since = data.standing_since
    if data.standing is Standing.CANDIDATE:
        return f"candidate run {version}"
    if data.standing is Standing.SERVED:
        return f"the served models (version {version})"
    state = {
        Standing.ACTIVE: ("active", "since"),
        Standing.SHADOW: ("in shadow", "since"),
        Standing.ROLLED_BACK: ("rolled back", "on"),
        Standing.RETIRED: ("retired", "on"),
    }
    what, preposition = state[data.standing]
    return (
        f"run {version} ({what})" if since is None else f"run {version} ({what} {preposition} {_day(since)})"
    )


def _risk_tick(u: float, _position: float) -> str:
    """Tick label of a log axis in ``u = 1 - risk_score``: show the risk_score people set thresholds in."""
    if u <= 0.0:
        return ""
    digits = max(1, round(-math.log10(u)))
    return f"{1.0 - u:.{digits}f}"


# ----------------------------------------------------------------------------------------------------- plots


def _save(figure: Figure, path: Path) -> Path:
    """Render on the Agg canvas (headless, no pyplot registry) without the version stamp, then free it.

    Minor ticks go first: on log axes they carry no label, and drawing them doubles the rendering time.
    """
    try:
        for axes in figure.axes:
            axes.minorticks_off()
        FigureCanvasAgg(figure)
        figure.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    finally:
        figure.clear()
    return path


def _panels(name: str, count: int) -> tuple[Figure, list[Axes]]:
    """A figure of ``count`` side-by-side axes with margins fixed in inches.

    Fixed margins instead of a layout engine: the axes sit at the same pixels in every report (plots of two
    runs can be flicked between), and drawing costs half as much as with constrained layout.
    """
    width, height = _SIZES[name]
    figure = Figure(figsize=(width, height), dpi=DPI)
    grid = figure.add_gridspec(
        1,
        count,
        left=_MARGIN_LEFT / width,
        right=1.0 - _MARGIN_RIGHT / width,
        bottom=_MARGIN_BOTTOM / height,
        top=1.0 - _MARGIN_TOP / height,
        wspace=_GAP / ((width - _MARGIN_LEFT - _MARGIN_RIGHT - (count - 1) * _GAP) / count),
    )
    return figure, [figure.add_subplot(grid[0, i]) for i in range(count)]


def _colour(label: str, index: int) -> str:
    # Whatever its standing, the evaluated set keeps the candidate's colour, so pages of different kinds
    # read alike; only labels no standing uses fall back to other colours.
    standing = {s.value for s in Standing} - set(_COLOURS)
    fallback = _EVALUATED_COLOUR if label in standing else _FALLBACK_COLOURS[index % len(_FALLBACK_COLOURS)]
    return _COLOURS.get(label, fallback)


def _tail_floor(thresholds: tuple[float, float]) -> float:
    """Smallest alert rate a tail axis shows: a decade finer than the strictest threshold, a power of ten."""
    finest = min((1.0 - t) / 10.0 for t in thresholds if t < 1.0) if min(thresholds) < 1.0 else _TAIL_FLOOR
    floor = max(min(_TAIL_FLOOR, finest), _MIN_TAIL_FLOOR)
    return float(10.0 ** math.floor(math.log10(floor)))


def _threshold_grid(thresholds: tuple[float, float]) -> FloatArray:
    """Thresholds log-spaced in ``1 - t``, from 0.9 (or the review threshold, if lower) to the tail floor."""
    review = min(thresholds)
    top = max(0.1, 10.0 ** math.ceil(math.log10(1.0 - review))) if review < 1.0 else 0.1
    return 1.0 - np.geomspace(min(top, 1.0), _tail_floor(thresholds), _GRID_POINTS)


def _tail(risk: FloatArray, floor: float) -> FloatArray:
    """``1 - risk_score`` clipped to the floor, so a score of exactly 1 still lands on the log axis."""
    return np.clip(1.0 - risk, floor, 1.0)


def _tail_axis(axes: Axes, floor: float, *, x: bool = True) -> None:
    """A log axis in ``1 - risk_score``, reversed so risk grows rightwards (or upwards), labelled in risk."""
    if x:
        axes.set_xscale("log")
        axes.set_xlim(1.0, floor)
        axes.xaxis.set_major_formatter(FuncFormatter(_risk_tick))
    else:
        axes.set_yscale("log")
        axes.set_ylim(1.0, floor)
        axes.yaxis.set_major_formatter(FuncFormatter(_risk_tick))


def _mark_thresholds(axes: Axes, thresholds: tuple[float, float], *, tail: bool, floor: float = 0.0) -> None:
    """Vertical lines at the REVIEW and DECLINE thresholds, in risk or in ``1 - risk`` units."""
    review, decline = thresholds
    for name, threshold, colour in (
        ("REVIEW", review, _REVIEW_COLOUR),
        ("DECLINE", decline, _DECLINE_COLOUR),
    ):
        position = max(1.0 - threshold, floor) if tail else threshold
        label = f"{name} ≥ {_threshold_text(threshold)}"
        axes.axvline(position, label=label, color=colour, linestyle="--", linewidth=1.2)


def _groups(fraud: BoolArray) -> list[tuple[str, BoolArray, str]]:
    """Row groups a distribution is split into: genuine and fraud when labels exist, else all rows."""
    if not fraud.any():
        return [("all rows (no fraud reported)", ~fraud, "-")]
    groups = [("genuine", ~fraud, "-"), ("fraud", fraud, ":")]
    return [group for group in groups if group[1].any()]


def _step_histogram(
    axes: Axes, values: FloatArray, bins: FloatArray, colour: str, linestyle: str, label: str | None
) -> None:
    """An outline histogram on a log count axis: several overlaid stay readable, empty bins stay blank."""
    axes.hist(
        values, bins=bins.tolist(), histtype="step", log=True, color=colour, linestyle=linestyle, label=label
    )


def _distribution_figure(sets: list[ScoredSet], fraud: BoolArray, thresholds: tuple[float, float]) -> Figure:
    """Histograms of risk_score over [0, 1] and over the tail on log counts, so bulk and alerts both show."""
    figure, (full, tail) = _panels(DISTRIBUTION_PNG, 2)
    floor = _tail_floor(thresholds)
    linear_bins = np.linspace(0.0, 1.0, _HIST_BINS + 1)
    tail_bins = np.geomspace(floor, 1.0, _HIST_BINS + 1)
    for index, scored in enumerate(sets):
        colour = _colour(scored.label, index)
        for group, rows, style in _groups(fraud):
            label = f"{scored.label} {_version_text(scored.version)} · {group}"
            _step_histogram(full, scored.risk[rows], linear_bins, colour, style, label)
            _step_histogram(tail, _tail(scored.risk[rows], floor), tail_bins, colour, style, None)
    _mark_thresholds(full, thresholds, tail=False)
    _mark_thresholds(tail, thresholds, tail=True, floor=floor)
    full.set(title="risk_score, full range", xlabel="risk_score", ylabel="rows (log scale)", xlim=(0.0, 1.0))
    _tail_axis(tail, floor)
    tail.set(title="upper tail (log scale in 1 − risk_score)", xlabel="risk_score", ylabel="rows (log scale)")
    for axes in (full, tail):
        axes.set_ylim(bottom=_LOG_COUNT_FLOOR)
    full.legend(fontsize="small", loc="lower center")
    tail.legend(fontsize="small", loc="lower left")
    return figure


def _alert_rate_figure(sets: list[ScoredSet], fraud: BoolArray, thresholds: tuple[float, float]) -> Figure:
    """Alert rate (and recall, with fraud labels) by threshold, with the calibration target ``1 - t`` drawn:
    a calibrated set follows the diagonal on normal traffic."""
    has_fraud = bool(fraud.any())
    figure, panels = _panels(ALERT_RATE_PNG, 2 if has_fraud else 1)
    rates = panels[0]
    grid = _threshold_grid(thresholds)
    floor = _tail_floor(thresholds)
    rows = len(fraud)
    rates.plot(1.0 - grid, 1.0 - grid, color="grey", linewidth=0.8, linestyle=":", label="calibrated: 1 − t")
    for index, scored in enumerate(sets):
        curve = [_alert_rate(scored.risk, t) for t in grid]
        label = f"{scored.label} {_version_text(scored.version)}"
        rates.plot(1.0 - grid, curve, color=_colour(scored.label, index), label=label)
    _mark_thresholds(rates, thresholds, tail=True, floor=floor)
    _tail_axis(rates, floor)
    rates.set_xlim(1.0 - grid[0], 1.0 - grid[-1])
    rates.set_yscale("log")
    rates.set_ylim(0.5 / rows, 1.0)
    rates.set(
        title="alert rate by threshold", xlabel="threshold t", ylabel="share of rows with risk_score ≥ t"
    )
    rates.legend(fontsize="small")
    if has_fraud:
        recall = panels[1]
        for index, scored in enumerate(sets):
            curve = [_recall(scored.risk, fraud, t) or 0.0 for t in grid]
            recall.plot(1.0 - grid, curve, color=_colour(scored.label, index), label=scored.label)
        _mark_thresholds(recall, thresholds, tail=True, floor=floor)
        _tail_axis(recall, floor)
        recall.set_xlim(1.0 - grid[0], 1.0 - grid[-1])
        recall.set(
            title="recall by threshold", xlabel="threshold t", ylabel="share of fraud with risk_score ≥ t"
        )
        recall.set_ylim(0.0, 1.02)
        recall.legend(fontsize="small")
    return figure


def _curve_label(scored: ScoredSet, found: Detection) -> str:
    return (
        f"{scored.label} {_version_text(scored.version)}: AP {_decimal(found.average_precision)}, "
        f"ROC-AUC {_decimal(found.roc_auc)}"
    )


def _operating_points(
    risk: FloatArray, fraud: BoolArray, thresholds: tuple[float, float]
) -> list[tuple[float, float, float]]:
    """(false-positive rate, recall, precision) at each threshold: where the server actually operates."""
    points = []
    for threshold in thresholds:
        flagged = risk >= threshold
        caught = int(np.sum(flagged & fraud))
        precision = caught / int(flagged.sum()) if flagged.any() else 1.0
        points.append((float(np.mean(flagged[~fraud])), caught / int(fraud.sum()), precision))
    return points


def _dot(axes: Axes, x: float, y: float, colour: str, edge: str) -> tuple[float, float]:
    """A threshold's operating point; returns where it is, for the legend to stay clear of it."""
    axes.plot(x, y, marker="o", markersize=_DOT_SIZE, color=colour, markeredgecolor=edge)
    return x, y


def _legend_clear_of(axes: Axes, dots: Sequence[tuple[float, float]], *, first: _LegendPlace) -> None:
    """The legend where it covers the fewest threshold ``dots`` (data coordinates), then the fewest curve
    vertices, then the earliest of ``first`` and ``_LEGEND_PLACES``.

    Not matplotlib's "best": that weighs every vertex of every curve alike, so with curves over most of
    the axes it may sit on a dot, the one thing the reader came to the plot for. Call it after the limits
    are set: the dots' pixels depend on them.
    """
    figure = axes.get_figure()
    assert isinstance(figure, Figure)
    if not isinstance(figure.canvas, FigureCanvasAgg):
        # Measuring the legend needs a renderer: the Agg canvas _save draws on, never pyplot's.
        FigureCanvasAgg(figure)
    # The dot's radius in pixels and a little air, so a legend edge does not graze it either.
    margin = _DOT_SIZE * DPI / 72.0 / 2.0 + 2.0
    marked = axes.transData.transform(np.asarray(dots, dtype=np.float64).reshape(-1, 2))
    curves = [line.get_transform().transform(line.get_xydata()) for line in axes.get_lines()]
    vertices = np.concatenate([marked, *curves]) if curves else marked
    places = list(dict.fromkeys((first, *_LEGEND_PLACES)))
    costs = []
    for place in places:
        box = axes.legend(fontsize="small", loc=place).get_window_extent().padded(margin)
        costs.append((int(box.count_contains(marked)), int(box.count_contains(vertices))))
    # min() keeps the first of equal costs: the order of preference.
    axes.legend(fontsize="small", loc=places[costs.index(min(costs))])


def _roc_figure(sets: list[ScoredSet], fraud: BoolArray, thresholds: tuple[float, float]) -> Figure:
    """ROC on a linear axis, and again on a log false-positive axis: alerts live below 1% false positives,
    a corner the linear plot squeezes into a few pixels."""
    figure, (linear, low) = _panels(ROC_PNG, 2)
    genuine = int((~fraud).sum())
    # The log axis cannot show a false-positive rate of 0: such dots sit at half a false positive.
    least = 0.5 / genuine
    linear_dots, low_dots = [], []
    for index, scored in enumerate(sets):
        fpr, tpr, _ = roc_curve(fraud, scored.risk)
        colour = _colour(scored.label, index)
        linear.plot(fpr, tpr, color=colour, label=_curve_label(scored, detection(fraud, scored.risk)))
        low.plot(np.maximum(fpr, least), tpr, color=colour)
        for (x, y, _), marker in zip(
            _operating_points(scored.risk, fraud, thresholds), (_REVIEW_COLOUR, _DECLINE_COLOUR), strict=True
        ):
            linear_dots.append(_dot(linear, x, y, marker, colour))
            low_dots.append(_dot(low, max(x, least), y, marker, colour))
    linear.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
    linear.set(title="ROC", xlabel="false-positive rate", ylabel="recall (true-positive rate)")
    linear.set(xlim=_UNIT_LIMITS, ylim=_UNIT_LIMITS)
    _legend_clear_of(linear, linear_dots, first="lower right")
    low.set_xscale("log")
    low.set(title="ROC, low false-positive rates (log)", xlabel="false-positive rate", ylabel="recall")
    # As on the linear axis, room for a whole dot at the least rate: 2% of the decades shown.
    decades = math.log10(1.0 / least)
    low.set(xlim=(least / 10.0 ** (0.02 * decades), 10.0 ** (0.02 * decades)), ylim=_UNIT_LIMITS)
    _threshold_legend(low, thresholds, low_dots)
    return figure


def _threshold_legend(
    axes: Axes, thresholds: tuple[float, float], dots: Sequence[tuple[float, float]]
) -> None:
    review, decline = thresholds
    for name, threshold, colour in (
        ("REVIEW", review, _REVIEW_COLOUR),
        ("DECLINE", decline, _DECLINE_COLOUR),
    ):
        axes.plot(
            [],
            [],
            marker="o",
            markersize=_DOT_SIZE,
            linestyle="",
            color=colour,
            label=f"at {name} ≥ {threshold:g}",
        )
    _legend_clear_of(axes, dots, first="upper left")


def _precision_recall_figure(
    sets: list[ScoredSet], fraud: BoolArray, thresholds: tuple[float, float]
) -> Figure:
    """Precision-recall: with ~1% fraud it shows what ROC flatters, how many alerts are false."""
    figure, (axes,) = _panels(PRECISION_RECALL_PNG, 1)
    dots = []
    for index, scored in enumerate(sets):
        precision, recall, _ = precision_recall_curve(fraud, scored.risk)
        colour = _colour(scored.label, index)
        axes.plot(recall, precision, color=colour, label=_curve_label(scored, detection(fraud, scored.risk)))
        for (_, x, y), marker in zip(
            _operating_points(scored.risk, fraud, thresholds), (_REVIEW_COLOUR, _DECLINE_COLOUR), strict=True
        ):
            dots.append(_dot(axes, x, y, marker, colour))
    prevalence = float(fraud.mean())
    axes.axhline(
        prevalence, color="grey", linewidth=0.8, linestyle=":", label=f"fraud share {prevalence:.2%}"
    )
    axes.set(
        title="precision-recall", xlabel="recall", ylabel="precision", xlim=_UNIT_LIMITS, ylim=_UNIT_LIMITS
    )
    _legend_clear_of(axes, dots, first="upper right")
    return figure


def _shadow_figure(shadow: ShadowScores, thresholds: tuple[float, float]) -> Figure:
    """Live traffic: tail distributions, active against shadow score per transaction, alert rates."""
    figure, (distribution, pairs, rates) = _panels(SHADOW_PNG, 3)
    floor = _tail_floor(thresholds)
    active = np.asarray(shadow.active_risk, dtype=np.float64)
    candidate = np.asarray(shadow.shadow_risk, dtype=np.float64)
    scorings = (("active", "active", active), ("shadow", f"shadow {shadow.version}", candidate))
    bins = np.geomspace(floor, 1.0, _HIST_BINS + 1)
    for key, label, risk in scorings:
        _step_histogram(distribution, _tail(risk, floor), bins, _COLOURS[key], "-", label)
    _mark_thresholds(distribution, thresholds, tail=True, floor=floor)
    _tail_axis(distribution, floor)
    distribution.set(
        title="live risk_score, upper tail", xlabel="risk_score", ylabel="transactions (log scale)"
    )
    distribution.set_ylim(bottom=_LOG_COUNT_FLOOR)
    distribution.legend(fontsize="small", loc="lower left")

    exponent = math.log10(floor)
    pairs.hexbin(
        _tail(active, floor),
        _tail(candidate, floor),
        gridsize=40,
        xscale="log",
        yscale="log",
        bins="log",
        mincnt=1,
        cmap="viridis",
        extent=(exponent, 0.0, exponent, 0.0),
    )
    pairs.plot([1.0, floor], [1.0, floor], color="grey", linewidth=0.8, linestyle=":")
    for threshold, colour in zip(thresholds, (_REVIEW_COLOUR, _DECLINE_COLOUR), strict=True):
        position = max(1.0 - threshold, floor)
        pairs.axvline(position, color=colour, linestyle="--", linewidth=1.2)
        pairs.axhline(position, color=colour, linestyle="--", linewidth=1.2)
    _tail_axis(pairs, floor)
    _tail_axis(pairs, floor, x=False)
    pairs.set(title="per transaction (log colour)", xlabel="active risk_score", ylabel="shadow risk_score")

    grid = _threshold_grid(thresholds)
    for key, label, risk in scorings:
        rates.plot(1.0 - grid, [_alert_rate(risk, t) for t in grid], color=_COLOURS[key], label=label)
    rates.plot(1.0 - grid, 1.0 - grid, color="grey", linewidth=0.8, linestyle=":", label="calibrated: 1 − t")
    _mark_thresholds(rates, thresholds, tail=True, floor=floor)
    _tail_axis(rates, floor)
    rates.set_xlim(1.0 - grid[0], 1.0 - grid[-1])
    rates.set_yscale("log")
    rates.set_ylim(0.5 / len(active), 1.0)
    rates.set(title="live alert rate by threshold", xlabel="threshold t", ylabel="share of transactions ≥ t")
    rates.legend(fontsize="small")
    return figure


# ------------------------------------------------------------------------------------------------------ HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1240px;
       padding: 0 1em; color: #1f2328; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #d0d7de; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: #f6f8fa; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: 0.92em; }
p.note { background: #fff8c5; border: 1px solid #d4a72c; padding: 0.6em 0.8em; }
.meta { color: #57606a; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _table(head: Sequence[str], body: Sequence[Sequence[str]], *, numeric_from: int = 1) -> str:
    """An HTML table of escaped cells; columns from ``numeric_from`` on are right-aligned numbers."""
    header = "".join(f"<th>{_e(cell)}</th>" for cell in head)
    lines = []
    for row in body:
        cells = "".join(
            f'<td class="num">{_e(cell)}</td>' if i >= numeric_from else f"<td>{_e(cell)}</td>"
            for i, cell in enumerate(row)
        )
        lines.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def _figure_html(name: str, alt: str, caption: str) -> str:
    width, height = (round(side * DPI) for side in _SIZES[name])
    return (
        f'<figure><img src="{_e(name)}" alt="{_e(alt)}" width="{width}" height="{height}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _metrics_table(
    labels: Sequence[str], metrics: Sequence[_SetMetrics], review: float, decline: float
) -> str:
    """One column per set, then ``last − first`` when there are two sets; "n/a" where labels are missing."""
    compare = len(metrics) == 2
    head = ["metric", *labels, *([f"{labels[1]} − {labels[0]}"] if compare else [])]
    body = []
    for row in _metric_rows(review, decline):
        values = [row.value(m) for m in metrics]
        cells = ["n/a" if value is None else row.show(value) for value in values]
        if compare:
            before, after = values
            if row.show_difference is None:
                cells.append("")
            elif before is None or after is None:
                cells.append("n/a")
            else:
                cells.append(row.show_difference(after - before))
        body.append([row.name, *cells])
    return _table(head, body)


def _label_note(fraud: BoolArray, what: str) -> str | None:
    """Why the label-based plots and metrics are missing, in a sentence; None when they are all there."""
    if not fraud.any():
        return (
            f"No ROC or precision-recall curves and no AP, ROC-AUC or recall: none of the {what} is labelled "
            f"fraud or chargeback, so there is no fraud to measure detection on. The score distributions and "
            f"alert rates below do not need labels."
        )
    if fraud.all():
        return (
            f"No ROC or precision-recall curves and no AP or ROC-AUC: every one of the {what} is labelled "
            f"fraud or chargeback, so there is no genuine transaction to count false alarms on. The score "
            f"distributions, alert rates and recall at the thresholds below do not need genuine rows."
        )
    return None


def _alone(data: ReportInput) -> bool:
    """Evaluated on its own by design (the served models), rather than for want of active models."""
    return data.active is None and data.standing is Standing.SERVED


def _header(data: ReportInput) -> str:
    evaluated = _evaluated(data)
    facts = [
        ("generated", _moment(data.generated_at)),
        ("evaluation window", f"{_moment(data.window_start)} → {_moment(data.window_end)}"),
        ("evaluated", evaluated),
    ]
    if not _alone(data):
        active = "nothing active (first training)"
        if data.active is not None:
            active = _version_text(data.active.version)
        facts.append(("active version", active))
    facts += [
        ("REVIEW threshold", f"risk_score ≥ {_threshold_text(data.review_threshold)}"),
        ("DECLINE threshold", f"risk_score ≥ {_threshold_text(data.decline_threshold)}"),
        ("evaluation rows", f"{len(data.fraud):,} ({int(data.fraud.sum()):,} labelled fraud or chargeback)"),
    ]
    if data.shadow is not None:
        facts.append(("shadow version", _version_text(data.shadow.version)))
    lines = "".join(f"<tr><th>{_e(key)}</th><td>{_e(value)}</td></tr>" for key, value in facts)
    if data.active is not None:
        active = _version_text(data.active.version)
        sentence = f"Evaluation of {evaluated} against the active models (version {active}) on the same rows."
    elif _alone(data):
        sentence = f"Evaluation of {evaluated}."
    else:
        sentence = f"Evaluation of {evaluated}: nothing was active to compare it with."
    return f'<h1>{_e(data.title)}</h1>\n<p class="meta">{_e(sentence)}</p>\n<table>{lines}</table>'


def _summary_section(summary: Sequence[tuple[str, str]]) -> str:
    if not summary:
        return ""
    return "<h2>Run summary</h2>\n" + _table(["fact", "value"], [[k, v] for k, v in summary], numeric_from=2)


def _evaluation_section(data: ReportInput, sets: Sequence[ScoredSet], written: set[str]) -> str:
    review, decline = data.review_threshold, data.decline_threshold
    metrics = [_set_metrics(s.risk, data.fraud, review, decline) for s in sets]
    parts = ["<h2>Metrics</h2>", _metrics_table([s.label for s in sets], metrics, review, decline)]
    if data.active is None and not _alone(data):
        parts.append(_note("Nothing was active before this run: there is no active set to compare with."))
    note = _label_note(data.fraud, "evaluation rows")
    if note is not None:
        parts.append(_note(note))
    parts.append("<h2>Plots</h2>")
    parts.append(
        _figure_html(
            DISTRIBUTION_PNG,
            "histograms of risk_score per set",
            "Histograms of risk_score per set (genuine solid, fraud dotted when labels exist) on a log count "
            "axis: left over the full range, right the upper tail on a log scale in 1 − risk_score, where "
            "scores of 1 are drawn at the right edge. Dashed lines: the REVIEW and DECLINE thresholds.",
        )
    )
    if ROC_PNG in written:
        parts.append(
            _figure_html(
                ROC_PNG,
                "ROC curves per set",
                "ROC curves on the labelled rows, with AP and ROC-AUC in the legend; right, the same curves "
                "on a log false-positive axis. Dots: where the REVIEW and DECLINE thresholds operate.",
            )
        )
    if PRECISION_RECALL_PNG in written:
        parts.append(
            _figure_html(
                PRECISION_RECALL_PNG,
                "precision-recall curves per set",
                "Precision-recall curves on the labelled rows; the dotted line is the fraud share, what a "
                "random ranking gets. Dots: the REVIEW and DECLINE thresholds.",
            )
        )
    parts.append(
        _figure_html(
            ALERT_RATE_PNG,
            "alert rate by threshold per set",
            "Share of rows with risk_score ≥ t over a threshold grid log-spaced in 1 − t; the dotted "
            "diagonal is what a calibrated score gives on normal traffic. With fraud labels, right: the "
            "share of fraud at or above t.",
        )
    )
    return "\n".join(parts)


def _shadow_section(shadow: ShadowScores, review: float, decline: float) -> str:
    parts = ['<h2 id="shadow">Shadow scoring on live traffic</h2>']
    live = len(shadow.fraud)
    if live == 0:
        parts.append(_note("The shadow candidate has not scored any live transaction yet."))
        return "\n".join(parts)
    active = np.asarray(shadow.active_risk, dtype=np.float64)
    candidate = np.asarray(shadow.shadow_risk, dtype=np.float64)
    changes = _decision_changes(shadow, review, decline)
    changed = live - int(np.trace(changes))
    rank = _spearman(active, candidate)
    agreement = [
        ["live transactions", f"{live:,}"],
        ["fraud or chargeback reported so far", f"{int(shadow.fraud.sum()):,}"],
        ["Spearman rank correlation", "n/a (a constant scoring)" if rank is None else _decimal(rank)],
        [f"overlap of the top {ALERT_RATE:.0%}", _percent(_top_overlap(active, candidate, ALERT_RATE))],
        ["decisions that would change", f"{changed:,} ({changed / live:.2%})"],
    ]
    parts.append(
        f"<p>Shadow version {_e(_version_text(shadow.version))}, scored next to the active models on the "
        "same transactions. Labels arrive late, so the label-based metrics are provisional.</p>"
    )
    parts.append(_table(["measure", "value"], agreement))
    parts.append("<p>Decisions at the thresholds: rows = active models, columns = shadow candidate.</p>")
    transitions = [[f"active {name}", *(f"{n:,}" for n in changes[i])] for i, name in enumerate(_DECISIONS)]
    parts.append(_table(["", *(f"shadow {name}" for name in _DECISIONS)], transitions))
    metrics = [_set_metrics(risk, shadow.fraud, review, decline) for risk in (active, candidate)]
    parts.append(_metrics_table(["active", "shadow"], metrics, review, decline))
    note = _label_note(shadow.fraud, "live transactions")
    if note is not None:
        parts.append(_note(note))
    parts.append(
        _figure_html(
            SHADOW_PNG,
            "live risk_score of the active models and the shadow candidate",
            "Left: live risk_score tails of both (log scales). Middle: each transaction's active against "
            "shadow score (hexagon colour: log count; dotted diagonal: equal scores; dashed: thresholds, so "
            "the off-diagonal blocks are changed decisions). Right: live alert rate by threshold.",
        )
    )
    return "\n".join(parts)


def _page(data: ReportInput, sets: Sequence[ScoredSet], written: set[str]) -> str:
    body = [_header(data), _summary_section(data.summary), _evaluation_section(data, sets, written)]
    if data.shadow is not None:
        body.append(_shadow_section(data.shadow, data.review_threshold, data.decline_threshold))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(data.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body>\n</html>\n"
    )


def _write_text_atomically(path: Path, text: str) -> None:
    """Write then rename, so a reader never opens half a page."""
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
