"""The evaluation report: files, real and deterministic plots, metrics checked against sklearn, edge cases."""

from __future__ import annotations

import dataclasses
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.image import imread
from matplotlib.lines import Line2D
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score

from posguard_server.pipeline import report
from posguard_server.pipeline.report import (
    ReportFiles,
    ReportInput,
    ScoredSet,
    ShadowScores,
    Standing,
    write_report,
)

ROWS = 5_000
FRAUD_SHARE = 0.02
REVIEW, DECLINE = 0.99, 0.999
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# (height, width) in pixels of every plot the report can draw.
SIZES = {
    "score_distribution.png": (450, 1200),
    "alert_rate.png": (450, 1200),
    "roc.png": (500, 1200),
    "precision_recall.png": (500, 700),
    "shadow.png": (450, 1500),
}
LABEL_PLOTS = ("roc.png", "precision_recall.png")
ACTIVE_BLUE = (31, 119, 180)  # matplotlib's tab:blue, the active set's colour
CANDIDATE_ORANGE = (255, 127, 14)  # tab:orange, the candidate's

HOSTILE_TITLE = "Retrain <script>alert('title')</script> & co"
HOSTILE_KEY = "<b>models</b>"
HOSTILE_VALUE = 'a & b <img src=x onerror="alert(1)">'
HOSTILE_VERSION = '2026-11-23"><script>x()</script>'


def _fraud(seed: int = 7, rows: int = ROWS) -> np.ndarray:
    return np.random.default_rng(seed).random(rows) < FRAUD_SHARE


def _risk(fraud: np.ndarray, seed: int, separation: float, ties_at: int = 0) -> np.ndarray:
    """Calibrated-looking scores: genuine ``1 - risk`` uniform, fraud pushed into the tail by separation.

    A few rows from ``ties_at`` on sit exactly on the thresholds and at 1: ``>=`` and ``>`` must differ.
    """
    rng = np.random.default_rng(seed)
    alert = rng.random(len(fraud))
    alert[fraud] = 0.05 * rng.random(int(fraud.sum())) ** separation
    risk = 1.0 - alert
    risk[ties_at : ties_at + 4] = (REVIEW, REVIEW, DECLINE, 1.0)
    return risk


def _input(
    *,
    fraud: np.ndarray | None = None,
    candidate_seed: int = 2,
    with_active: bool = True,
    with_shadow: bool = True,
) -> ReportInput:
    labels = _fraud() if fraud is None else fraud
    live = _fraud(seed=11, rows=3_000)
    shadow = ShadowScores(
        version=HOSTILE_VERSION,
        active_risk=_risk(live, seed=12, separation=1.0),
        shadow_risk=_risk(live, seed=13, separation=3.0, ties_at=10),
        fraud=live,
    )
    return ReportInput(
        title=HOSTILE_TITLE,
        generated_at=datetime(2026, 11, 23, 12, 0, tzinfo=UTC),
        window_start=datetime(2026, 11, 1, tzinfo=UTC),
        window_end=datetime(2026, 11, 22, tzinfo=UTC),
        fraud=labels,
        candidate=ScoredSet("candidate", HOSTILE_VERSION, _risk(labels, seed=candidate_seed, separation=3.0)),
        active=ScoredSet("active", "2026-10-01", _risk(labels, seed=1, separation=1.0))
        if with_active
        else None,
        review_threshold=REVIEW,
        decline_threshold=DECLINE,
        summary=[("customer models trained", "1,234"), (HOSTILE_KEY, HOSTILE_VALUE)],
        shadow=shadow if with_shadow else None,
    )


def _pixels(path: Path) -> np.ndarray:
    return imread(path)


def _has_colour(path: Path, rgb: tuple[int, int, int]) -> bool:
    image = np.round(_pixels(path)[:, :, :3] * 255).astype(int)
    return bool(np.all(image == np.array(rgb), axis=2).any())


def _page(files: ReportFiles) -> str:
    return files.html.read_text(encoding="utf-8")


def _row(name: str, *cells: str) -> str:
    return f"<tr><td>{name}</td>" + "".join(f'<td class="num">{cell}</td>' for cell in cells) + "</tr>"


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> ReportFiles:
    return write_report(_input(), tmp_path_factory.mktemp("full"))


@pytest.fixture(scope="module")
def full_again(tmp_path_factory: pytest.TempPathFactory) -> ReportFiles:
    return write_report(_input(), tmp_path_factory.mktemp("full_again"))


@pytest.fixture(scope="module")
def first_training(tmp_path_factory: pytest.TempPathFactory) -> ReportFiles:
    return write_report(_input(with_active=False, with_shadow=False), tmp_path_factory.mktemp("first"))


def test_writes_the_page_and_every_plot_as_png_of_its_size(full: ReportFiles) -> None:
    directory = full.html.parent
    assert full.html == directory / "index.html"
    assert {path.name for path in full.images} == set(SIZES)
    for path in full.images:
        assert path.parent == directory
        assert path.read_bytes().startswith(PNG_SIGNATURE)
        assert _pixels(path).shape == (*SIZES[path.name], 4)
    page = _page(full)
    for name in SIZES:
        assert f'<img src="{name}"' in page
    assert "<style>" in page
    assert "http://" not in page
    assert "https://" not in page
    assert "<script" not in page
    assert "<link" not in page


def test_plots_draw_both_sets_in_their_colours(full: ReportFiles, first_training: ReportFiles) -> None:
    for name in ("score_distribution.png", "alert_rate.png", *LABEL_PLOTS):
        assert _has_colour(full.html.parent / name, ACTIVE_BLUE), name
        assert _has_colour(full.html.parent / name, CANDIDATE_ORANGE), name
        assert _has_colour(first_training.html.parent / name, CANDIDATE_ORANGE), name
        assert not _has_colour(first_training.html.parent / name, ACTIVE_BLUE), name


def test_identical_inputs_give_identical_pixels(full: ReportFiles, full_again: ReportFiles) -> None:
    for name in SIZES:
        assert np.array_equal(_pixels(full.html.parent / name), _pixels(full_again.html.parent / name)), name
    assert _page(full) == _page(full_again)


def test_other_scores_give_other_pixels_only_where_those_scores_are_drawn(
    full: ReportFiles, tmp_path: Path
) -> None:
    changed = write_report(_input(candidate_seed=3), tmp_path)
    for name in ("score_distribution.png", "alert_rate.png", *LABEL_PLOTS):
        assert not np.array_equal(_pixels(full.html.parent / name), _pixels(tmp_path / name)), name
    # The shadow plot shows live scores, which did not change.
    assert np.array_equal(
        _pixels(full.html.parent / "shadow.png"), _pixels(changed.html.parent / "shadow.png")
    )


def test_metrics_match_sklearn_as_the_report_formats_them(full: ReportFiles) -> None:
    data = _input()
    page = _page(full)
    assert data.active is not None
    active, candidate = data.active.risk, data.candidate.risk
    ap = [average_precision_score(data.fraud, risk) for risk in (active, candidate)]
    auc = [roc_auc_score(data.fraud, risk) for risk in (active, candidate)]
    assert ap[1] > ap[0]  # the synthetic candidate is better, so a sign slip would show
    assert _row("average precision", f"{ap[0]:.4f}", f"{ap[1]:.4f}", f"{ap[1] - ap[0]:+.4f}") in page
    assert _row("ROC-AUC", f"{auc[0]:.4f}", f"{auc[1]:.4f}", f"{auc[1] - auc[0]:+.4f}") in page
    assert _row("rows", f"{ROWS:,}", f"{ROWS:,}", "") in page
    assert _row("frauds", *[f"{int(data.fraud.sum()):,}"] * 2, "") in page

    rate = [float(np.mean(risk >= REVIEW)) for risk in (active, candidate)]
    caught = [float(np.mean(risk[data.fraud] >= DECLINE)) for risk in (active, candidate)]
    difference = f"{100 * (rate[1] - rate[0]):+.2f} pp"
    assert _row("alert rate at REVIEW (≥ 0.99)", f"{rate[0]:.2%}", f"{rate[1]:.2%}", difference) in page
    difference = f"{100 * (caught[1] - caught[0]):+.2f} pp"
    assert _row("recall at DECLINE (≥ 0.999)", f"{caught[0]:.2%}", f"{caught[1]:.2%}", difference) in page

    top = int(ROWS * 0.01)
    recall = [
        data.fraud[np.argsort(-risk, kind="stable")[:top]].sum() / data.fraud.sum()
        for risk in (active, candidate)
    ]
    difference = f"{100 * (recall[1] - recall[0]):+.2f} pp"
    assert _row("recall at 1% alert rate", f"{recall[0]:.2%}", f"{recall[1]:.2%}", difference) in page


def test_shadow_section_reports_agreement_and_changed_decisions(full: ReportFiles) -> None:
    shadow = _input().shadow
    assert shadow is not None
    page = _page(full)
    assert '<h2 id="shadow">' in page
    rho = spearmanr(shadow.active_risk, shadow.shadow_risk).statistic
    assert _row("Spearman rank correlation", f"{rho:.4f}") in page

    def decide(risk: np.ndarray) -> np.ndarray:
        return (risk >= REVIEW).astype(int) + (risk >= DECLINE).astype(int)

    before, after = decide(shadow.active_risk), decide(shadow.shadow_risk)
    changed = int(np.sum(before != after))
    assert changed > 0
    assert _row("decisions that would change", f"{changed:,} ({changed / len(shadow.fraud):.2%})") in page
    for i, name in enumerate(("APPROVE", "REVIEW", "DECLINE")):
        counts = [f"{int(np.sum((before == i) & (after == j))):,}" for j in range(3)]
        assert _row(f"active {name}", *counts) in page
    ap = average_precision_score(shadow.fraud, shadow.shadow_risk)
    assert f'<td class="num">{ap:.4f}</td>' in page


def test_hostile_strings_are_escaped(full: ReportFiles) -> None:
    page = _page(full)
    for raw in (HOSTILE_TITLE, HOSTILE_KEY, HOSTILE_VALUE, HOSTILE_VERSION):
        assert raw not in page
    assert "<title>Retrain &lt;script&gt;alert(&#x27;title&#x27;)&lt;/script&gt; &amp; co</title>" in page
    assert "<td>&lt;b&gt;models&lt;/b&gt;</td>" in page
    assert "<td>a &amp; b &lt;img src=x onerror=&quot;alert(1)&quot;&gt;</td>" in page
    assert "2026-11-23&quot;&gt;&lt;script&gt;x()&lt;/script&gt;" in page
    assert "<td>customer models trained</td><td>1,234</td>" in page


def test_first_training_has_no_active_column_and_no_shadow(first_training: ReportFiles) -> None:
    page = _page(first_training)
    assert "nothing active (first training)" in page
    assert "candidate − active" not in page
    assert "<th>metric</th><th>candidate</th></tr>" in page
    assert 'id="shadow"' not in page
    assert "shadow.png" not in page
    assert not (first_training.html.parent / "shadow.png").exists()
    assert {path.name for path in first_training.images} == set(SIZES) - {"shadow.png"}
    data = _input(with_active=False, with_shadow=False)
    ap = average_precision_score(data.fraud, data.candidate.risk)
    assert _row("average precision", f"{ap:.4f}") in page


def test_without_fraud_labels_the_label_plots_give_way_to_a_sentence(tmp_path: Path) -> None:
    files = write_report(_input(fraud=np.zeros(ROWS, dtype=bool), with_shadow=False), tmp_path)
    page = _page(files)
    assert "none of the evaluation rows is labelled fraud or chargeback" in page
    assert {path.name for path in files.images} == {"score_distribution.png", "alert_rate.png"}
    for name in LABEL_PLOTS:
        assert not (tmp_path / name).exists()
        assert name not in page
    for name in ("score_distribution.png", "alert_rate.png"):
        assert _pixels(tmp_path / name).shape == (*SIZES[name], 4)
        assert f'<img src="{name}"' in page
    assert _row("average precision", "n/a", "n/a", "n/a") in page


def test_only_fraud_rows_over_an_old_report_removes_its_stale_plots(
    full: ReportFiles, tmp_path: Path
) -> None:
    directory = tmp_path / "report"
    shutil.copytree(full.html.parent, directory)
    files = write_report(_input(fraud=np.ones(ROWS, dtype=bool), with_shadow=False), directory)
    page = _page(files)
    assert "there is no genuine transaction to count false alarms on" in page
    for name in (*LABEL_PLOTS, "shadow.png"):
        assert not (directory / name).exists()
    assert sorted(path.name for path in directory.iterdir()) == [
        "alert_rate.png",
        "index.html",
        "score_distribution.png",
    ]
    data = _input(fraud=np.ones(ROWS, dtype=bool))
    assert data.active is not None
    assert _row("average precision", "n/a", "n/a", "n/a") in page
    for name, threshold in (("REVIEW", REVIEW), ("DECLINE", DECLINE)):
        # Every row is fraud, so the recall at a threshold is its alert rate.
        caught = [float(np.mean(risk >= threshold)) for risk in (data.active.risk, data.candidate.risk)]
        cells = (f"{caught[0]:.2%}", f"{caught[1]:.2%}", f"{100 * (caught[1] - caught[0]):+.2f} pp")
        assert _row(f"recall at {name} (≥ {threshold:g})", *cells) in page
        assert _row(f"alert rate at {name} (≥ {threshold:g})", *cells) in page


def test_an_empty_shadow_says_so_without_a_plot(tmp_path: Path) -> None:
    empty = ShadowScores("v2", np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool))
    unlabelled = _input(fraud=np.zeros(ROWS, dtype=bool), with_active=False, with_shadow=False)
    data = dataclasses.replace(unlabelled, shadow=empty)
    files = write_report(data, tmp_path)
    assert "has not scored any live transaction yet" in _page(files)
    assert not (tmp_path / "shadow.png").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"fraud": np.zeros(0, dtype=bool)}, "evaluation set is empty"),
        ({"review_threshold": 0.9999}, "thresholds"),
        ({"fraud": np.zeros(ROWS, dtype=np.int64)}, "boolean"),
        ({"candidate": ScoredSet("candidate", "v2", np.full(ROWS - 1, 0.5))}, "one score per row"),
        ({"candidate": ScoredSet("candidate", "v2", np.full(ROWS, np.nan))}, r"\[0, 1\]"),
        ({"candidate": ScoredSet("candidate", "v2", np.full(ROWS, 1.5))}, r"\[0, 1\]"),
        ({"candidate": ScoredSet("active", "v2", np.full(ROWS, 0.5))}, "share the label"),
    ],
)
def test_bad_input_is_a_clear_value_error(change: dict[str, object], message: str, tmp_path: Path) -> None:
    data = dataclasses.replace(_input(with_shadow=False), **change)
    with pytest.raises(ValueError, match=message):
        write_report(data, tmp_path / "report")
    assert not (tmp_path / "report").exists()


# -- what the page calls the evaluated models -----------------------------------------------------------

SINCE = datetime(2026, 11, 30, 9, 15, tzinfo=UTC)
AGAINST_ACTIVE = " against the active models (version 2026-10-01) on the same rows."


@pytest.mark.parametrize(
    ("standing", "since", "with_active", "evaluated", "rest"),
    [
        (Standing.CANDIDATE, None, True, "candidate run v2", AGAINST_ACTIVE),
        (Standing.CANDIDATE, None, False, "candidate run v2", ": nothing was active to compare it with."),
        (Standing.SERVED, None, False, "the served models (version v2)", "."),
        (Standing.SHADOW, SINCE, True, "run v2 (in shadow since 2026-11-30 09:15 UTC)", AGAINST_ACTIVE),
        (Standing.SHADOW, None, True, "run v2 (in shadow)", AGAINST_ACTIVE),
        (Standing.ACTIVE, SINCE, True, "run v2 (active since 2026-11-30 09:15 UTC)", AGAINST_ACTIVE),
        (Standing.ROLLED_BACK, SINCE, True, "run v2 (rolled back on 2026-11-30 09:15 UTC)", AGAINST_ACTIVE),
        (Standing.RETIRED, None, True, "run v2 (retired)", AGAINST_ACTIVE),
    ],
)
def test_the_header_says_what_was_evaluated_against_what(
    standing: Standing, since: datetime | None, with_active: bool, evaluated: str, rest: str, tmp_path: Path
) -> None:
    data = _input(with_active=with_active, with_shadow=False)
    data = dataclasses.replace(
        data,
        candidate=ScoredSet(standing.value, "v2", data.candidate.risk),
        standing=standing,
        standing_since=since,
    )
    page = _page(write_report(data, tmp_path))
    assert f'<p class="meta">Evaluation of {evaluated}{rest}</p>' in page
    assert f"<tr><th>evaluated</th><td>{evaluated}</td></tr>" in page
    assert "Evaluation of served" not in page


def test_a_rolled_back_run_is_not_called_the_candidate(tmp_path: Path) -> None:
    data = _input(with_shadow=False)
    data = dataclasses.replace(
        data,
        candidate=ScoredSet(Standing.ROLLED_BACK.value, "v2", data.candidate.risk),
        standing=Standing.ROLLED_BACK,
        standing_since=SINCE,
    )
    page = _page(write_report(data, tmp_path))
    assert "run v2 (rolled back on 2026-11-30 09:15 UTC)" in page
    assert "<th>metric</th><th>active</th><th>rolled back</th><th>rolled back − active</th>" in page
    assert "candidate" not in page
    # The evaluated set keeps the candidate's colour whatever it is called.
    assert _has_colour(tmp_path / "roc.png", CANDIDATE_ORANGE)


def test_the_served_models_alone_are_not_a_first_training(tmp_path: Path) -> None:
    data = _input(with_active=False, with_shadow=False)
    served = dataclasses.replace(
        data, candidate=ScoredSet("served", "v2", data.candidate.risk), standing=Standing.SERVED
    )
    page = _page(write_report(served, tmp_path))
    assert "first training" not in page
    assert "Nothing was active" not in page
    assert "<th>metric</th><th>served</th></tr>" in page


# -- threshold dots: in view, and never under a legend ---------------------------------------------------

REVIEW_DOT = to_rgba(report._REVIEW_COLOUR)


def _sharp(fraud: np.ndarray) -> np.ndarray:
    """A candidate whose threshold dots sit where legends and axis spines are: REVIEW catches 85% of the
    fraud at about 90% precision (the upper right of precision-recall), DECLINE 40% without one false
    alarm (false-positive rate 0, on the ROC's left spine)."""
    risk = 1.0 - (0.02 + 0.98 * np.random.default_rng(5).random(len(fraud)))  # below both thresholds
    frauds, genuine = np.flatnonzero(fraud), np.flatnonzero(~fraud)
    risk[frauds[: int(0.85 * len(frauds))]] = (REVIEW + DECLINE) / 2
    risk[frauds[: int(0.4 * len(frauds))]] = (DECLINE + 1.0) / 2
    risk[genuine[:8]] = (REVIEW + DECLINE) / 2
    return risk


def _drawn(figure: Figure) -> Figure:
    FigureCanvasAgg(figure).draw()
    return figure


def _label_figures() -> list[Figure]:
    data = _input(with_shadow=False)
    data = dataclasses.replace(data, candidate=ScoredSet("candidate", "v2", _sharp(data.fraud)))
    sets, thresholds = report._scored_sets(data), (REVIEW, DECLINE)
    return [
        _drawn(report._roc_figure(sets, data.fraud, thresholds)),
        _drawn(report._precision_recall_figure(sets, data.fraud, thresholds)),
    ]


def _dots(axes: Axes) -> list[Line2D]:
    """The threshold dots: one-point lines with a marker (the legend's own handles are not in axes.lines)."""
    return [line for line in axes.get_lines() if line.get_marker() == "o" and len(line.get_xydata()) == 1]


def _centre(axes: Axes, dot: Line2D) -> tuple[float, float]:
    x, y = axes.transData.transform(dot.get_xydata()[0])
    return float(x), float(y)


def test_no_legend_covers_a_threshold_dot() -> None:
    for figure in _label_figures():
        for axes in figure.axes:
            legend = axes.get_legend()
            assert legend is not None
            box = legend.get_window_extent()
            dots = _dots(axes)
            assert any(to_rgba(dot.get_markerfacecolor()) == REVIEW_DOT for dot in dots)
            for dot in dots:
                assert not box.contains(*_centre(axes, dot)), (axes.get_title(), dot.get_xydata())


def test_threshold_dots_at_the_edge_of_the_range_show_whole() -> None:
    roc, precision_recall = _label_figures()
    linear, _ = roc.axes
    assert linear.get_xlim()[0] < 0.0  # a dot at false-positive rate 0 has room to the left
    for figure in (roc, precision_recall):
        for axes in figure.axes:
            frame = axes.get_window_extent()
            for dot in _dots(axes):
                x, y = _centre(axes, dot)
                radius = dot.get_markersize() * figure.dpi / 72 / 2
                where = (axes.get_title(), dot.get_xydata())
                assert frame.x0 <= x - radius, where
                assert x + radius <= frame.x1, where
                assert frame.y0 <= y - radius, where
                assert y + radius <= frame.y1, where
