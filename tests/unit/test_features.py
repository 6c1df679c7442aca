"""Training and serving compute the same features: batch over a history table vs. the stored profile."""

from __future__ import annotations

import csv
import gzip
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from posguard_models.features import FEATURES, Event, Profile, batch_features, profile_of

DATA = Path(__file__).parents[1] / "data"


def _history(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with gzip.open(DATA / f"{name}_sample.csv.gz", "rt", newline="") as handle:
        rows = [
            (
                r["customer_ref"],
                datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")).timestamp(),
                float(r["amount"]),
            )
            for r in csv.DictReader(handle)
        ]
    rows.sort(key=lambda r: (r[0], r[1]))
    return (
        np.array([r[0] for r in rows], dtype=object),
        np.array([r[1] for r in rows]),
        np.array([r[2] for r in rows]),
    )


@pytest.mark.parametrize("name", ["handbook", "sparkov"])
def test_online_profile_gives_the_batch_features_bit_for_bit(name: str) -> None:
    customers, times, amounts = _history(name)
    batch = batch_features(customers, times, amounts)
    online = np.zeros_like(batch)
    profiles: dict[str, Profile] = {}
    for i, (customer, time, amount) in enumerate(zip(customers, times, amounts, strict=True)):
        profile = profiles.setdefault(customer, Profile())
        event = Event(float(time), float(amount))
        online[i] = profile.features(event)
        profile.update(event)
        # Every profile goes through storage now and then, as it does between requests.
        if i % 7 == 0:
            profiles[customer] = Profile.from_bytes(profile.to_bytes())
    assert np.array_equal(batch, online)
    assert batch.shape == (len(times), len(FEATURES))
    # The features are not trivially constant: each one varies on real data.
    assert np.all(batch.std(axis=0) > 0)


def test_features_use_only_the_past() -> None:
    customers = np.array(["a"] * 4, dtype=object)
    times = np.array([0.0, 600.0, 1200.0, 1800.0])
    base = batch_features(customers, times, np.array([10.0, 10.0, 10.0, 10.0]))
    changed_future = batch_features(customers, times, np.array([10.0, 10.0, 10.0, 5000.0]))
    assert np.array_equal(base[:3], changed_future[:3])


def test_features_are_one_sided_and_name_what_they_catch() -> None:
    customers = np.array(["a"] * 6, dtype=object)
    times = np.arange(6) * 86400.0
    x = batch_features(customers, times, np.array([40.0, 40.0, 40.0, 40.0, 1.0, 400.0]))
    above, level, _, spend = (x[:, FEATURES.index(n)] for n in FEATURES)
    assert above[4] == 0.0  # smaller than usual is not a risk
    assert above[5] == pytest.approx(np.log1p(400) - np.mean(np.log1p([40, 40, 40, 40, 1])))
    assert level[4] == level[0] == np.log1p(50)  # floored
    assert spend[5] > 0


def test_a_burst_of_large_amounts_counts_in_the_two_hour_window() -> None:
    customers = np.array(["a"] * 13, dtype=object)
    times = np.r_[np.arange(10) * 86400.0, 10 * 86400.0 + np.array([0.0, 600.0, 1200.0])]
    amounts = np.r_[np.full(10, 20.0), [900.0, 900.0, 900.0]]
    x = batch_features(customers, times, amounts)
    burst = x[:, FEATURES.index("recent_large_2h")]
    assert burst[10] == 0.0
    assert burst[12] > burst[11] > 0.0


def test_profile_summary_helpers() -> None:
    profile = profile_of([0.0, 3600.0], [10.0, 30.0])
    assert profile.count == 2
    assert profile.typical_amount() == pytest.approx(np.expm1((np.log1p(10) + np.log1p(30)) / 2))
    assert Profile().typical_amount() is None


@pytest.mark.parametrize(
    "data",
    [b"", b"{}", b"not json", b'{"format": 99}', b'{"format": 1, "count": 1, "recent": [[1, 2]]}'],
)
def test_a_damaged_profile_is_a_clear_error(data: bytes) -> None:
    with pytest.raises(ValueError, match="invalid customer profile"):
        Profile.from_bytes(data)


def test_rows_out_of_time_order_are_refused() -> None:
    with pytest.raises(ValueError, match="time order"):
        batch_features(np.array(["a", "a"], dtype=object), np.array([2.0, 1.0]), np.array([1.0, 1.0]))
