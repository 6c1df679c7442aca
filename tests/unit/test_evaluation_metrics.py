"""Recall at the alert rate: ties at the cut are shared; a scenario's recall is read in the real alert set."""

from __future__ import annotations

import numpy as np
import pytest

from posguard_models.evaluation import ALERT_RATE, alert_shares, by_scenario, detection, resolution


def test_tied_scores_at_the_cut_share_the_places_left_whatever_their_order() -> None:
    scores = np.array([0.9, 0.5, 0.5, 0.5, 0.5, 0.1])
    shares = alert_shares(scores, 3 / 6)  # three places: 0.9 and two of the four tied at 0.5
    assert shares.tolist() == [1.0, 0.5, 0.5, 0.5, 0.5, 0.0]
    assert shares.sum() == pytest.approx(3)
    # One fraud among the ties, one at the bottom. In any arrival order (a plain top-k would count the tied
    # fraud in or out by its position), it gets half a place: recall 0.25.
    y = np.array([False, True, False, False, False, True])
    assert detection(y, scores).recall_at_alert_rate == pytest.approx(0.0)  # k = 1% of 6 is one place
    rng = np.random.default_rng(7)
    for order in [np.arange(6), np.arange(6)[::-1], *(rng.permutation(6) for _ in range(8))]:
        picked = alert_shares(scores[order], 3 / 6)[y[order]].sum() / y.sum()
        assert picked == pytest.approx(0.25)


def test_no_ties_is_the_plain_top_k() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random(1000)
    shares = alert_shares(scores, ALERT_RATE)
    top = np.argsort(-scores)[:10]
    assert set(np.flatnonzero(shares == 1.0)) == set(top.tolist())
    assert shares.sum() == 10


def test_a_scenarios_recall_counts_only_its_frauds_in_the_overall_alert_set() -> None:
    # 1,000 transactions, 1% alert set = 10 places. Scenario 1's 10 frauds score highest and take them all;
    # scenario 2's 10 frauds score just below. Re-ranked without scenario 1, scenario 2 would look perfect.
    n = 1000
    scores = np.linspace(0.0, 0.5, n)
    y = np.zeros(n, dtype=bool)
    scenario = np.zeros(n, dtype=np.int64)
    y[-10:], scenario[-10:], scores[-10:] = True, 1, 0.99
    y[-20:-10], scenario[-20:-10], scores[-20:-10] = True, 2, 0.9
    per = by_scenario(y, scores, scenario)
    assert per[1].recall_at_alert_rate == pytest.approx(1.0)
    assert per[2].recall_at_alert_rate == pytest.approx(0.0)
    assert per[2].average_precision == pytest.approx(1.0)  # its ranking among genuine ones is perfect
    assert detection(y, scores).recall_at_alert_rate == pytest.approx(0.5)


def test_resolution_counts_the_share_at_or_above_each_level_and_the_ties() -> None:
    scores = np.array([0.2, 0.5, 0.5, 0.5, 0.9, 0.95, 0.99, 0.999, 0.3, 0.6])
    result = resolution(scores)
    assert result.at_or_above == {0.5: 0.8, 0.9: 0.4, 0.99: 0.2, 0.999: 0.1}
    assert (result.distinct, result.most_common_share) == (8, 0.3)
    assert result.as_dict()["at_or_above_0.999"] == 0.1
