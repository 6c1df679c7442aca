"""Training and serving compute the same features: batch over a history table vs. the stored profile."""

from __future__ import annotations

import csv
import gzip
import json
import math
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from posguard_models.features import (
    FEATURES,
    RECENT_LIMIT,
    Event,
    Profile,
    batch_features,
    profile_of,
)

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


def _busy_customer() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A customer far past RECENT_LIMIT: 30 ordinary days, then 3 x RECENT_LIMIT purchases in 6 hours."""
    rng = np.random.default_rng(7)
    quiet = np.arange(30) * 86400.0 + rng.uniform(0, 3600, 30)
    busy = 30 * 86400.0 + np.sort(rng.uniform(0, 6 * 3600, 3 * RECENT_LIMIT))
    times = 1.5e9 + np.r_[quiet, busy]
    amounts = np.round(np.r_[rng.lognormal(3, 0.5, 30), rng.lognormal(5, 1, 3 * RECENT_LIMIT)], 2)
    return np.array(["busy"] * len(times), dtype=object), times, amounts


@pytest.mark.parametrize("name", ["handbook", "sparkov"])
def test_online_profile_gives_the_batch_features_bit_for_bit(name: str) -> None:
    customers, times, amounts = (
        np.concatenate(parts) for parts in zip(_history(name), _busy_customer(), strict=True)
    )
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


def test_the_bound_changes_what_a_busy_customer_sees_and_nothing_else() -> None:
    customers, times, amounts = _busy_customer()
    x = batch_features(customers, times, amounts)
    profile = profile_of(times[:-1], amounts[:-1])
    assert [t for t, _, _ in profile.recent] == times[-RECENT_LIMIT - 1 : -1].tolist()
    # The last row's 24 h spend counts its RECENT_LIMIT predecessors only, not the whole burst.
    daily = amounts[:-1].sum() / ((times[-1] - times[0]) / 86400.0)
    bounded = amounts[-RECENT_LIMIT - 1 :].sum()
    assert bounded < amounts[30:].sum()
    spend = x[-1, FEATURES.index("spend_24h_above_daily")]
    assert spend == pytest.approx(math.log1p(bounded) - math.log1p(daily))
    # Below the bound the windows are the unbounded ones: the rows up to the bound are those of a customer
    # whose history stops there.
    head = 30 + RECENT_LIMIT + 1
    assert np.array_equal(x[:head], batch_features(customers[:head], times[:head], amounts[:head]))


def _full_profile() -> Profile:
    _, times, amounts = _busy_customer()
    return profile_of(times, amounts)


def test_a_stored_profile_round_trips_exactly_and_stays_bounded() -> None:
    profile = _full_profile()
    data = profile.to_bytes()
    assert data[0] == 2  # the binary format is what is written
    assert len(data) == 43 + 24 * RECENT_LIMIT
    assert Profile.from_bytes(data) == profile
    assert Profile.from_bytes(Profile().to_bytes()) == Profile()


def _format_1(profile: Profile) -> bytes:
    # What earlier versions stored: JSON with repr-exact floats.
    return json.dumps(
        {
            "format": 1,
            "count": profile.count,
            "first_time": profile.first_time,
            "last_time": profile.last_time,
            "sum_log_amount": profile.sum_log_amount,
            "total_spend": profile.total_spend,
            "recent": profile.recent,
        },
        separators=(",", ":"),
    ).encode()


def test_a_profile_stored_by_an_earlier_version_is_read_and_rewritten() -> None:
    ordinary = profile_of([0.0, 3600.0, 7200.0], [10.0, 30.0, 12.5])
    assert Profile.from_bytes(_format_1(ordinary)) == ordinary
    # An unbounded format-1 state of a busy customer is read with the bound applied.
    full = _full_profile()
    unbounded = Profile(
        full.count, full.first_time, full.last_time, full.sum_log_amount, full.total_spend,
        [(full.first_time + i, 1.0, 0.0) for i in range(3 * RECENT_LIMIT)] + full.recent,
    )  # fmt: skip
    read = Profile.from_bytes(_format_1(unbounded))
    assert read == full
    assert Profile.from_bytes(read.to_bytes()) == full


_VALID = profile_of([0.0, 3600.0], [10.0, 30.0]).to_bytes()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{}",
        b"not json",
        b'{"format": 99}',
        b'{"format": 1, "count": 1, "recent": [[1, 2]]}',
        _VALID[:-1],  # truncated
        _VALID[:20],  # truncated inside the header
        _VALID + b"\0",  # trailing bytes
        bytes([99]) + _VALID[1:],  # unknown format
        _VALID[:1] + (1).to_bytes(8, "little") + _VALID[9:],  # two entries for one transaction
        _VALID[:1] + (-5).to_bytes(8, "little", signed=True) + _VALID[9:],  # negative count
    ],
)
def test_a_damaged_profile_is_a_clear_error(data: bytes) -> None:
    with pytest.raises(ValueError, match="invalid customer profile"):
        Profile.from_bytes(data)


def test_rows_out_of_time_order_are_refused() -> None:
    with pytest.raises(ValueError, match="time order"):
        batch_features(np.array(["a", "a"], dtype=object), np.array([2.0, 1.0]), np.array([1.0, 1.0]))
