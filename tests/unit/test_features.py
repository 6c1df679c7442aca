"""Training and serving compute the same features: batch over a history table vs. the stored profile."""

from __future__ import annotations

import csv
import gzip
import json
import math
import struct
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from posguard_models.features import (
    FEATURES,
    PLACE_LIMIT,
    RECENT_LIMIT,
    Event,
    Profile,
    batch_features,
    place_hash,
    profile_of,
)

DATA = Path(__file__).parents[1] / "data"


Table = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _history(name: str) -> Table:
    """The sample's rows by customer and time: customer, time, amount, place, latitude, longitude."""
    with gzip.open(DATA / f"{name}_sample.csv.gz", "rt", newline="") as handle:
        rows = [
            (
                r["customer_ref"],
                datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")).timestamp(),
                float(r["amount"]),
                r["terminal_id"] or r["merchant_id"],
                float(r["lat"]),
                float(r["lon"]),
            )
            for r in csv.DictReader(handle)
        ]
    rows.sort(key=lambda r: (r[0], r[1]))
    latitudes = np.array([r[4] for r in rows])
    # Some requests carry no location: every tenth row here.
    latitudes[::10] = np.nan
    return (
        np.array([r[0] for r in rows], dtype=object),
        np.array([r[1] for r in rows]),
        np.array([r[2] for r in rows]),
        np.array([r[3] for r in rows], dtype=object),
        latitudes,
        np.array([r[5] for r in rows]),
    )


def _busy_customer() -> Table:
    """A customer far past every bound: 30 ordinary days, then 3 x RECENT_LIMIT purchases in 6 hours, at
    more distinct places than PLACE_LIMIT."""
    rng = np.random.default_rng(7)
    quiet = np.arange(30) * 86400.0 + rng.uniform(0, 3600, 30)
    busy = 30 * 86400.0 + np.sort(rng.uniform(0, 6 * 3600, 3 * RECENT_LIMIT))
    times = 1.5e9 + np.r_[quiet, busy]
    amounts = np.round(np.r_[rng.lognormal(3, 0.5, 30), rng.lognormal(5, 1, 3 * RECENT_LIMIT)], 2)
    places = np.array([f"T{i % (PLACE_LIMIT + 20)}" for i in rng.permutation(len(times))], dtype=object)
    return (
        np.array(["busy"] * len(times), dtype=object),
        times,
        amounts,
        places,
        45.0 + rng.normal(0, 0.2, len(times)),
        7.0 + rng.normal(0, 0.2, len(times)),
    )


@pytest.mark.parametrize("name", ["handbook", "sparkov"])
def test_online_profile_gives_the_batch_features_bit_for_bit(name: str) -> None:
    customers, times, amounts, places, latitudes, longitudes = (
        np.concatenate(parts) for parts in zip(_history(name), _busy_customer(), strict=True)
    )
    batch = batch_features(customers, times, amounts, places, latitudes, longitudes)
    online = np.zeros_like(batch)
    profiles: dict[str, Profile] = {}
    for i, customer in enumerate(customers):
        profile = profiles.setdefault(customer, Profile())
        event = Event(float(times[i]), float(amounts[i]), places[i], latitudes[i], longitudes[i])
        online[i] = profile.features(event)
        profile.update(event)
        # Every profile goes through storage now and then, as it does between requests.
        if i % 7 == 0:
            profiles[customer] = Profile.from_bytes(profile.to_bytes())
    assert np.array_equal(batch, online)
    assert batch.shape == (len(times), len(FEATURES))
    # The features are not trivially constant: each one varies on real data.
    assert np.all(batch.std(axis=0) > 0)
    # Every profile stayed within its bounds.
    assert max(len(p.places) for p in profiles.values()) == PLACE_LIMIT


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
    above, level, _, spend, *_ = (x[:, FEATURES.index(n)] for n in FEATURES)
    assert above[4] == 0.0  # smaller than usual is not a risk
    assert above[5] == pytest.approx(np.log1p(400) - np.mean(np.log1p([40, 40, 40, 40, 1])))
    assert level[4] == level[0] == np.log1p(50)  # floored
    assert spend[5] > 0


def test_an_hour_the_customer_rarely_pays_at_is_unusual_and_a_usual_one_is_not() -> None:
    customers = np.array(["a"] * 32, dtype=object)
    # Thirty days paying at noon, then once at noon and once at 3 a.m. (UTC).
    times = np.r_[
        np.arange(30) * 86400.0 + 12 * 3600.0, 30 * 86400.0 + 12.5 * 3600.0, 31 * 86400.0 + 3 * 3600.0
    ]
    x = batch_features(customers, times, np.full(32, 20.0))
    unusual = x[:, FEATURES.index("hour_unusual")]
    assert unusual[0] == 0.0  # nothing known yet
    assert unusual[30] == 0.0  # this customer's hour
    # None of the 31 earlier ones within an hour of 3 a.m.: ln(3/24) - ln((0 + 3/24) / (31 + 1)).
    assert unusual[31] == pytest.approx(math.log(32))


def test_a_new_place_and_a_distant_one_are_flagged_against_the_customer_s_own() -> None:
    customers = np.array(["a"] * 6, dtype=object)
    places = np.array(["T1", "T2", "T1", "T2", "T9", "T1"], dtype=object)
    latitudes = np.array([45.0, 45.01, 45.0, 45.01, 46.0, np.nan])
    longitudes = np.array([7.0, 7.0, 7.0, 7.0, 7.0, np.nan])
    x = batch_features(customers, np.arange(6) * 3600.0, np.full(6, 20.0), places, latitudes, longitudes)
    new_place = x[:, FEATURES.index("new_place")]
    assert new_place.tolist() == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    distance = x[:, FEATURES.index("distance_above_usual")]
    # About 110 km from a customer who stays within about 1 km of their mean place.
    assert distance[4] > math.log1p(50.0)
    assert distance[5] == 0.0  # no location, nothing to say
    profile = profile_of(np.arange(4) * 3600.0, np.full(4, 20.0), places[:4], latitudes[:4], longitudes[:4])
    km = profile.distance_km(Event(5 * 3600.0, 20.0, "T9", 46.0, 7.0))
    assert km == pytest.approx(111.2 - 0.6, abs=0.5)


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
    customers, times, amounts, *_ = _busy_customer()
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
    _, times, amounts, places, latitudes, longitudes = _busy_customer()
    return profile_of(times, amounts, places, latitudes, longitudes)


def _without_habits(profile: Profile) -> Profile:
    """What a profile stored before the habit features holds of ``profile``."""
    return Profile(
        profile.count,
        profile.first_time,
        profile.last_time,
        profile.sum_log_amount,
        profile.total_spend,
        list(profile.recent),
    )


def test_a_stored_profile_round_trips_exactly_and_stays_bounded() -> None:
    profile = _full_profile()
    data = profile.to_bytes()
    assert data[0] == 3  # the current binary format is what is written
    assert len(data) == 173 + 8 * PLACE_LIMIT + 24 * RECENT_LIMIT  # the most any profile takes
    assert len(data) < 2900
    assert Profile.from_bytes(data) == profile
    assert Profile.from_bytes(Profile().to_bytes()) == Profile()


def _format_2(profile: Profile) -> bytes:
    # What the previous version stored: the header and the recent entries, no habits.
    return struct.pack(
        f"<BqddddH{3 * len(profile.recent)}d",
        2,
        profile.count,
        profile.first_time,
        profile.last_time,
        profile.sum_log_amount,
        profile.total_spend,
        len(profile.recent),
        *[value for entry in profile.recent for value in entry],
    )


def test_a_profile_of_the_previous_format_is_read_without_habits_that_then_fill_in() -> None:
    full = _full_profile()
    read = Profile.from_bytes(_format_2(full))
    assert read == _without_habits(full)
    # What it lacks starts at the quiet end: no hour is unusual, no place new, no place far, yet.
    event = Event(full.last_time + 60.0, 20.0, "never-seen", 10.0, 10.0)
    assert read.habit_features(event) == (0.0, 0.0, 0.0)
    assert full.habit_features(event)[1:] == (1.0, pytest.approx(full.habit_features(event)[2]))
    assert full.habit_features(event)[2] > 0.0
    # ... and fills in from the next transaction on, stored in the current format.
    read.update(event)
    again = Profile.from_bytes(read.to_bytes())
    assert again.places == [place_hash("never-seen")]
    assert again.habit_features(Event(event.time + 60.0, 20.0, "other", 10.0, 10.0))[1] == 1.0


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
    assert Profile.from_bytes(_format_1(ordinary)) == _without_habits(ordinary)
    # An unbounded format-1 state of a busy customer is read with the bound applied.
    full = _full_profile()
    unbounded = Profile(
        full.count, full.first_time, full.last_time, full.sum_log_amount, full.total_spend,
        [(full.first_time + i, 1.0, 0.0) for i in range(3 * RECENT_LIMIT)] + full.recent,
    )  # fmt: skip
    read = Profile.from_bytes(_format_1(unbounded))
    assert read == _without_habits(full)
    assert Profile.from_bytes(read.to_bytes()) == _without_habits(full)


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
        _format_2(profile_of([0.0], [10.0]))[:-1],  # a truncated profile of the previous format
        _format_2(profile_of([0.0], [10.0]))[:20],
    ],
)
def test_a_damaged_profile_is_a_clear_error(data: bytes) -> None:
    with pytest.raises(ValueError, match="invalid customer profile"):
        Profile.from_bytes(data)


def test_rows_out_of_time_order_are_refused() -> None:
    with pytest.raises(ValueError, match="time order"):
        batch_features(np.array(["a", "a"], dtype=object), np.array([2.0, 1.0]), np.array([1.0, 1.0]))


def test_a_copy_moves_on_and_the_profile_it_came_from_stays_as_it_was() -> None:
    """The server explains a score from the profile before the transaction and stores the copy after it: the
    explanation's hours and places ("3 of this customer's 5 earlier transactions...") must not count it."""
    profile = Profile()
    for i in range(5):
        profile.update(Event(1_700_000_000.0 + i * 3600, 20.0, f"t{i}", 40.0, -73.0))
    before = Profile.from_bytes(profile.to_bytes())
    after = profile.copy()
    after.update(Event(1_700_000_000.0 + 10 * 3600, 900.0, "new", 48.0, 2.0))
    assert profile == before
    assert after.count == 6
    assert sum(after.hours) == 6
    assert len(after.places) == 6
