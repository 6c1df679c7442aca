"""Training, calibration, combination, label feedback and the global-model artifact."""

from __future__ import annotations

import csv
import gzip
import io
import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binom

from posguard_models.evaluation import CALIBRATION_LEVELS, by_scenario, detection
from posguard_models.explain import explain
from posguard_models.features import (
    CORE_FEATURES,
    FEATURE_GROUPS,
    FEATURES,
    Event,
    batch_features,
    profile_of,
)
from posguard_models.model import CORE, Calibration, GlobalModel, interp_rows
from posguard_models.retraining import CustomerForest, ModelSet, set_risk
from posguard_models.training import History, TrainingConfig, terminal_counts, train

DATA = Path(__file__).parents[1] / "data"
DAY = 86400.0


def _table(name: str) -> dict[str, np.ndarray]:
    with gzip.open(DATA / f"{name}_sample.csv.gz", "rt", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows.sort(key=lambda r: (r["customer_ref"], r["timestamp"]))
    t = np.array([datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")).timestamp() for r in rows])
    return {
        "customers": np.array([r["customer_ref"] for r in rows], dtype=object),
        "times": t,
        "amounts": np.array([float(r["amount"]) for r in rows]),
        "keys": np.array([r["terminal_id"] or r["merchant_id"] for r in rows], dtype=object),
        "latitudes": np.array([float(r["lat"]) for r in rows]),
        "longitudes": np.array([float(r["lon"]) for r in rows]),
        "fraud": np.array([r["is_fraud"] == "1" for r in rows]),
        "scenario": np.array([int(r["fraud_scenario"]) for r in rows]),
    }


def _history(table: dict[str, np.ndarray], rows: np.ndarray, *, labels: bool) -> History:
    fraud = table["fraud"][rows] & labels
    return History(
        customers=table["customers"][rows],
        times=table["times"][rows],
        amounts=table["amounts"][rows],
        keys=table["keys"][rows],
        fraud=fraud,
        label_times=np.where(fraud, table["times"][rows] + 7 * DAY, np.nan),
        latitudes=table["latitudes"][rows],
        longitudes=table["longitudes"][rows],
    )


def _features(table: dict[str, np.ndarray]) -> np.ndarray:
    """Every row's features, as a profile advanced through the table would give them."""
    return batch_features(
        table["customers"],
        table["times"],
        table["amounts"],
        table["keys"],
        table["latitudes"],
        table["longitudes"],
    )


@pytest.fixture(scope="module")
def handbook() -> dict[str, np.ndarray]:
    return _table("handbook")


CONFIG = TrainingConfig(seed=0, n_estimators=50, customer_estimators=20, customer_min_history=30)


def test_training_ranks_fraud_above_genuine_on_unseen_days(handbook: dict[str, np.ndarray]) -> None:
    start = handbook["times"].min()
    history = handbook["times"] < start + 72 * DAY
    trained = train(_history(handbook, history, labels=False), CONFIG)
    model = trained.global_model
    own = {m.customer: m for m in trained.customer_models}
    assert own, "customers with enough history get their own forest"
    x = _features(handbook)
    test = np.flatnonzero(handbook["times"] >= start + 84 * DAY)
    scores = []
    for i in test:
        m = own.get(handbook["customers"][i])
        scores.append(model.score(x[i], m.forest if m else None, m.sample_count if m else 0).risk_score)
    result = detection(handbook["fraud"][test], np.array(scores))
    # Far above the fraud rate (what a random ranking scores): the model finds the amount-based scenarios.
    assert result.average_precision > 5 * handbook["fraud"][test].mean()
    assert result.roc_auc > 0.6
    per = by_scenario(handbook["fraud"][test], np.array(scores), handbook["scenario"][test])
    assert per[3].average_precision > per[2].average_precision  # scenario 2 is invisible without labels


def test_labelled_fraud_never_becomes_a_training_row(handbook: dict[str, np.ndarray]) -> None:
    rows = np.arange(len(handbook["times"]))
    unlabelled = train(_history(handbook, rows, labels=False), CONFIG)
    labelled = train(_history(handbook, rows, labels=True), CONFIG)
    assert unlabelled.sample_count == len(rows)
    assert labelled.sample_count == len(rows) - int(handbook["fraud"].sum())
    assert labelled.global_model.feedback is not None
    assert unlabelled.global_model.feedback is None
    assert labelled.metrics["feedback_window_days"] in CONFIG.feedback_windows_days


def test_calibration_reads_as_an_alert_rate() -> None:
    rng = np.random.default_rng(3)
    reference = rng.normal(0.5, 0.05, 20_000)
    calibration = Calibration.fit(reference)
    risks = calibration.many(reference)
    assert np.all(np.diff(calibration.many(np.sort(reference))) >= 0)  # monotone
    assert np.mean(risks >= 0.99) == pytest.approx(0.01, abs=0.002)
    assert np.mean(risks >= 0.9) == pytest.approx(0.10, abs=0.005)
    # Beyond the training maximum scores keep their order instead of tying at 1.
    top = reference.max()
    assert calibration(top + 0.01) < calibration(top + 0.05) < 1.0
    assert calibration(reference.min() - 1) == 0.0


def test_tied_scores_take_the_middle_of_their_range() -> None:
    # 70% of the reference share one score (one-sided feature vectors tie): it reads as 0.2 + 0.35 = 0.55,
    # the middle of the 0.2-0.9 range it covers, not 0.9, so at most half the range separates any threshold
    # inside it from the share of traffic at or above it.
    rng = np.random.default_rng(5)
    reference = np.concatenate(
        [rng.uniform(0.0, 0.4, 2_000), np.full(7_000, 0.5), rng.uniform(0.6, 1.0, 1_000)]
    )
    calibration = Calibration.fit(reference)
    assert calibration(0.5) == pytest.approx(0.55)
    risks = calibration.many(reference)
    for level in (0.1, 0.3, 0.7, 0.95, 0.99):
        assert np.mean(risks >= level) == pytest.approx(1 - level, abs=0.35 + 0.005)
    for level in (0.1, 0.95, 0.99):  # outside the tied range the share is exact up to the reference's grain
        assert np.mean(risks >= level) == pytest.approx(1 - level, abs=0.005)
    # Knots are distinct scores, however many rows tie, and at most the number asked for.
    assert len(calibration.scores) == len(np.unique(calibration.scores)) <= 4096
    assert np.all(np.diff(calibration.fractions) > 0)


def test_global_model_artifact_round_trips_without_pickle(handbook: dict[str, np.ndarray]) -> None:
    rows = np.arange(len(handbook["times"]))
    model = train(_history(handbook, rows, labels=True), CONFIG).global_model
    loaded = GlobalModel.from_bytes(model.to_bytes())
    x = _features(handbook)[:500]
    for row in x:
        assert loaded.score(row, None, 0, (2, 5)) == model.score(row, None, 0, (2, 5))
    assert np.array_equal(loaded.feature_quantiles, model.feature_quantiles)


def _meta(artifact: bytes) -> dict:  # type: ignore[type-arg]
    with np.load(io.BytesIO(artifact), allow_pickle=False) as archive:
        meta: dict = json.loads(archive["meta"].tobytes().decode())  # type: ignore[type-arg]
    return meta


def _with_meta(artifact: bytes, meta: dict) -> bytes:  # type: ignore[type-arg]
    """The artifact with its metadata replaced: what another version would have written."""
    with np.load(io.BytesIO(artifact), allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def test_a_feedback_model_stored_before_the_tie_breaker_scores_as_fitted(
    handbook: dict[str, np.ndarray],
) -> None:
    rows = np.arange(len(handbook["times"]))
    model = train(_history(handbook, rows, labels=True), CONFIG).global_model
    assert model.feedback is not None
    assert model.feedback.tie_break > 0
    # The same artifact as an earlier version wrote it: no tie_break in the feedback metadata.
    meta = _meta(model.to_bytes())
    del meta["feedback"]["tie_break"]
    old = GlobalModel.from_bytes(_with_meta(model.to_bytes(), meta))
    assert old.feedback is not None
    assert old.feedback.tie_break == 0.0
    x = _features(handbook)[0]
    fb = old.feedback
    anomaly = old.calibration(
        float(old.statistic_many([-old.forest.score_one(x[:CORE])], x[np.newaxis])[0][0])
    )
    expected = fb.calibration(
        float(np.log(fb.fraud_probability(anomaly) / (1 - fb.fraud_probability(anomaly))))
    )
    assert old.score(x, None, 0, None).risk_score == pytest.approx(expected, abs=1e-12)


def test_a_model_of_the_core_features_only_is_served_on_them_until_retrained(
    handbook: dict[str, np.ndarray],
) -> None:
    """A global model stored before the group features (format 1) keeps scoring, on the four core columns."""
    rows = np.arange(len(handbook["times"]))
    trained = train(_history(handbook, rows, labels=False), CONFIG).global_model
    assert trained.core_calibration is not None
    assert len(trained.groups) == len(FEATURE_GROUPS)
    # What the previous version trained on the same rows: the core forest, calibrated on its own score.
    core_only = GlobalModel(
        forest=trained.forest,
        calibration=trained.core_calibration,
        feature_quantiles=trained.feature_quantiles[:CORE],
        combine_n0=trained.combine_n0,
        customer_min_history=trained.customer_min_history,
        feedback=None,
        meta={"sample_count": trained.meta["sample_count"]},
    )
    data = core_only.to_bytes()
    meta = _meta(data)
    assert (meta["format_version"], meta["feature_version"], meta["features"]) == (1, 1, list(CORE_FEATURES))
    old = GlobalModel.from_bytes(data)
    assert old.groups == ()
    assert old.core_calibration is None
    x = _features(handbook)[:300]
    assert x.shape[1] == len(FEATURES)
    for row in x:
        score = old.score(row, None, 0)
        assert score.risk_score == trained.core_calibration(-trained.forest.score_one(row[:CORE]))
        assert score.groups == ()
    # Reasons never cite a feature the old model has no quantiles for.
    assert np.all(old.rarity_many(x)[:, CORE:] == 1.0)
    # A model claiming the new features in the old format is refused, not guessed at.
    meta["features"] = list(FEATURES)
    with pytest.raises(ValueError, match="other feature definitions"):
        GlobalModel.from_bytes(_with_meta(data, meta))


@pytest.mark.parametrize(
    "damage", [lambda b: b[: len(b) // 2], lambda b: b"PK" + b"\x00" * 64, lambda b: b""]
)
def test_a_damaged_global_model_is_a_clear_error(handbook: dict[str, np.ndarray], damage) -> None:  # type: ignore[no-untyped-def]
    rows = np.arange(2000)
    data = train(_history(handbook, rows, labels=False), CONFIG).global_model.to_bytes()
    with pytest.raises(ValueError, match="invalid global risk model"):
        GlobalModel.from_bytes(damage(data))


def test_terminal_counts_match_a_direct_count() -> None:
    # Three customers at one terminal; fraud reported a day after each fraud.
    customers = np.array(["a", "b", "c", "a", "b", "c"], dtype=object)
    times = np.array([0, 1, 2, 3, 4, 5], dtype=float) * DAY
    fraud = np.array([True, True, False, False, False, False])
    history = History(
        customers=customers,
        times=times,
        amounts=np.ones(6),
        keys=np.array(["T1"] * 6, dtype=object),
        fraud=fraud,
        label_times=np.where(fraud, times + DAY, np.nan),
    )
    frauds, seen = terminal_counts(history, window_days=3)
    # Row 3 (day 3) sees days 0-2: customers a, b, c; frauds of a (reported day 1) and b (reported day 2).
    assert (frauds[3], seen[3]) == (2, 3)
    # Row 1 (day 1) sees day 0 only; a's fraud was reported at day 1 == t, which counts.
    assert (frauds[1], seen[1]) == (1, 1)
    assert (frauds[0], seen[0]) == (0, 0)
    # Row 5 (day 5) sees days 2-4: c, a, b; b's fraud (day 1) is outside the window.
    assert (frauds[5], seen[5]) == (0, 3)


@pytest.mark.parametrize("labels", [False, True], ids=["anomaly only", "with label feedback"])
def test_scoring_a_batch_gives_the_row_by_row_scores_and_reasons_bit_for_bit(
    handbook: dict[str, np.ndarray], labels: bool
) -> None:
    """The server scores a batch at once; the answers must be exactly those of scoring each row alone."""
    start = handbook["times"].min()
    history = handbook["times"] < start + 72 * DAY
    trained = train(_history(handbook, history, labels=labels), CONFIG)
    model = trained.global_model
    assert (model.feedback is not None) is labels
    own = {m.customer: m for m in trained.customer_models}
    x = _features(handbook)
    rows = np.flatnonzero(~history)[:400]
    X = x[rows]  # noqa: N806 - a matrix
    X[::37, 2] = np.nan  # a missing value takes the forests' other branch
    # Every fifth row as a customer without a model of their own (the global forest alone).
    forests = [own[c].forest if i % 5 else None for i, c in enumerate(handbook["customers"][rows])]
    histories = [own[c].sample_count if i % 5 else 0 for i, c in enumerate(handbook["customers"][rows])]
    rng = np.random.default_rng(0)
    terminals = [
        (int(f), int(f + n)) if i % 3 else None
        for i, (f, n) in enumerate(
            zip(rng.integers(0, 4, len(rows)), rng.integers(1, 30, len(rows)), strict=True)
        )
    ]
    assert len({id(f) for f in forests if f is not None}) > 1

    batch = model.score_many(X, forests, histories, terminals)
    alone = [model.score(X[i], forests[i], histories[i], terminals[i]) for i in range(len(rows))]

    def bits(value: float) -> bytes:
        return np.float64(value).tobytes()

    assert [tuple(map(bits, (s.raw, s.anomaly_risk, s.risk_score, s.evidence))) for s in batch] == [
        tuple(map(bits, (s.raw, s.anomaly_risk, s.risk_score, s.evidence))) for s in alone
    ]
    # What each group added, to the bit; and the groups do add something on some rows.
    assert [[(g, bits(v)) for g, v in s.groups] for s in batch] == [
        [(g, bits(v)) for g, v in s.groups] for s in alone
    ]
    assert {g for s in batch for g, _ in s.groups} == {name for name, _ in FEATURE_GROUPS}
    assert [s.used_customer_model for s in batch] == [s.used_customer_model for s in alone]
    assert np.array_equal(model.rarity_many(X), np.stack([model.rarity(row) for row in X]), equal_nan=True)


def test_interpolating_every_column_at_once_is_numpys_interp_bit_for_bit() -> None:
    """``interp_rows`` (a lone score's rarity) against ``np.interp`` a column at a time (a batch's)."""
    rng = np.random.default_rng(7)
    points = 101
    columns = [
        np.sort(rng.normal(size=points)),
        np.sort(rng.integers(0, 3, points).astype(np.float64)),  # long ties, as a 0/1 feature's quantiles
        np.concatenate([np.zeros(60), np.sort(rng.exponential(size=points - 60))]),  # ties at the bottom
        np.concatenate([np.sort(rng.uniform(size=points - 30)), np.ones(30)]),  # ties at the top
        np.full(points, 2.5),  # one value throughout
        np.concatenate([[-np.inf], np.sort(rng.normal(size=points - 2)), [np.inf]]),  # infinite ends
    ]
    xp = np.stack(columns)
    fp = np.linspace(0.0, 1.0, points)
    # Values on every point, between points, beyond both ends, and the special ones.
    picks = [xp[:, rng.integers(0, points, 40)].T, rng.normal(scale=2.0, size=(200, len(xp)))]
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, 2.5, 1e300, -1e300])
    picks.append(np.repeat(special[:, np.newaxis], len(xp), axis=1))
    values = np.concatenate(picks)
    for start in range(0, len(values), 3):  # rows a few at a time, as a small batch comes
        chunk = values[start : start + 3]
        expected = np.column_stack([np.interp(chunk[:, i], column, fp) for i, column in enumerate(xp)])
        assert interp_rows(chunk, xp, fp).tobytes() == expected.tobytes(), chunk


# -- the alert-rate test ------------------------------------------------------------------------------
# On days the models never saw, ``1 - risk_score`` reads as the share of traffic alerted.
#
# Hold out every fifth day of a sample, train on the other days (with label feedback: on their reported fraud
# too), score the held-out days as a server would, and check the share of transactions at or above 0.5, 0.9,
# 0.99 and 0.999 against 0.5, 0.1, 0.01 and 0.001, with and without label feedback.
#
# Why days spread over the whole period rather than the last ones: the claim under test is that a score reads
# as an alert rate for traffic like the traffic the model was trained on. Days after the training window add
# drift, which no calibration can foresee (on Sparkov the amounts above a customer's usual grow into the
# summer: in the evaluation protocol's test days, 13% of transactions score at or above 0.9); the evaluation
# report measures that out-of-time share on the development files (``evaluate`` prints it).
#
# The tolerance is a sampling bound, not a fudge factor. Were the held-out transactions independent draws from
# the reference distribution, the count at or above a level would be binomial. They are not independent: a
# customer's transactions share that customer's habits (the samples hold 12 and 30 customers), so the rate on
# held-out days moves with which customers are in them. The bound therefore widens the binomial by the design
# effect measured on the scores (the clustered variance of a ratio over the customers, Kish's estimator, over
# the binomial variance; at least 1): the count is held to the two-sided 99.9% binomial interval at the
# effective sample size ``n / design effect``. The design effect is centred on the observed rate, so a
# calibration that is off everywhere does not widen its own bound.

SERVING_CONFIG = TrainingConfig(seed=0)  # the defaults: the test is about what a deployment answers
LABEL_DELAY = 7 * DAY
CONFIDENCE = 0.999


def held_out_scores(name: str, *, labels: bool) -> tuple[np.ndarray, np.ndarray]:
    """``risk_score`` of every transaction of the held-out days (every fifth day), and its customer."""
    table = _table(name)
    times = table["times"]
    held = (times - times.min()) // DAY % 5 == 4
    fraud = table["fraud"] & labels
    reported = times + LABEL_DELAY

    def history(rows: np.ndarray) -> History:
        return History(
            customers=table["customers"][rows],
            times=times[rows],
            amounts=table["amounts"][rows],
            keys=table["keys"][rows],
            fraud=fraud[rows],
            label_times=np.where(fraud[rows], reported[rows], np.nan),
            latitudes=table["latitudes"][rows],
            longitudes=table["longitudes"][rows],
        )

    trained = train(history(~held), SERVING_CONFIG)
    models = ModelSet(
        trained.global_model,
        {m.customer: CustomerForest(m.forest, m.sample_count) for m in trained.customer_models},
    )
    # Scored as a server would: features over everything stored before, place counts of reports in by then.
    everything = history(np.ones(len(times), dtype=np.bool_))
    return set_risk(everything, everything.features(), held, models), table["customers"][held]


def acceptable(scores: np.ndarray, customers: np.ndarray, level: float) -> tuple[float, float, float]:
    """(observed share at or above ``level``, lowest and highest share the bound accepts)."""
    n = len(scores)
    above = scores >= level
    observed = float(above.mean())
    nominal = 1.0 - level
    _, group = np.unique(customers, return_inverse=True)
    counts = np.bincount(group, weights=above.astype(np.float64))
    sizes = np.bincount(group).astype(np.float64)
    clusters = len(sizes)
    clustered = clusters / (clusters - 1) * float(np.sum((counts - observed * sizes) ** 2)) / n**2
    binomial = max(observed * (1.0 - observed), 1.0 / n) / n
    effective = max(1, int(n / max(1.0, clustered / binomial)))
    low, high = binom.interval(CONFIDENCE, effective, nominal)
    return observed, low / effective, high / effective


@pytest.mark.parametrize("labels", [False, True], ids=["without-labels", "with-labels"])
@pytest.mark.parametrize("name", ["handbook", "sparkov"])
def test_share_at_or_above_a_score_is_one_minus_it_on_held_out_days(name: str, labels: bool) -> None:
    scores, customers = held_out_scores(name, labels=labels)
    for level in CALIBRATION_LEVELS:
        observed, low, high = acceptable(scores, customers, level)
        assert low <= observed <= high, (
            f"{name}: {observed:.4f} at or above {level}, accepted {low:.4f}-{high:.4f}"
        )


@pytest.mark.parametrize("labels", [False, True], ids=["without-labels", "with-labels"])
def test_held_out_scores_keep_their_resolution(labels: bool) -> None:
    # Ties at an alert cut make the alert set depend on arrival order; label feedback must not quantise.
    scores, _ = held_out_scores("handbook", labels=labels)
    _, counts = np.unique(scores, return_counts=True)
    assert len(counts) > 0.5 * len(scores)
    assert counts.max() < 0.05 * len(scores)


def test_a_group_that_raised_the_score_is_named_with_its_numbers(handbook: dict[str, np.ndarray]) -> None:
    rows = np.arange(len(handbook["times"]))
    model = train(_history(handbook, rows, labels=False), CONFIG).global_model
    # Sixty days at noon, at one terminal near (0.1, 0.1), for about 40; then 200 at 3 a.m., elsewhere.
    day0 = 1.6e9 // DAY * DAY
    times = day0 + np.arange(60) * DAY + 12 * 3600.0
    profile = profile_of(times, np.full(60, 40.0), ["T1"] * 60, np.full(60, 0.1), np.full(60, 0.1))
    event = Event(day0 + 60 * DAY + 3 * 3600.0, 200.0, "T9", 0.9, 0.9)
    x = profile.features(event)
    score = model.score(x, None, 0)
    added = dict(score.groups)
    assert set(added) == {"time", "place"}
    assert min(added.values()) > 0
    reasons = {r.code: r for r in explain(model, x, score, profile, event, currency="EUR")}
    assert reasons["UNUSUAL_HOUR"].message == (
        "time of day: 0 of this customer's 60 earlier transactions were within an hour of 03:00 UTC"
    )
    assert reasons["FAR_FROM_USUAL_PLACES"].message == "place: 126 km from this customer's usual places"
    assert sum(r.weight for r in reasons.values()) == pytest.approx(1.0, abs=1e-3)
    # An ordinary amount at the customer's hour, at a new terminal far away: the place group alone speaks.
    elsewhere = Event(day0 + 60 * DAY + 12 * 3600.0, 40.0, "T9", 0.9, 0.9)
    x = profile.features(elsewhere)
    score = model.score(x, None, 0)
    assert [name for name, _ in score.groups] == ["place"]
    reasons = {r.code: r for r in explain(model, x, score, profile, elsewhere, currency="EUR")}
    assert reasons["NEW_TERMINAL"].message == "place: terminal never used by this customer"
    assert set(reasons) == {"NEW_TERMINAL", "FAR_FROM_USUAL_PLACES"}
    # The same payment at the customer's hour and terminal: no group adds anything, no group reason.
    usual = Event(day0 + 60 * DAY + 12 * 3600.0, 40.0, "T1", 0.1, 0.1)
    x = profile.features(usual)
    score = model.score(x, None, 0)
    assert score.groups == ()
    codes = {r.code for r in explain(model, x, score, profile, usual, currency="EUR")}
    assert not codes & {"UNUSUAL_HOUR", "NEW_TERMINAL", "FAR_FROM_USUAL_PLACES"}
