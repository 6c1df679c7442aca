"""The customer profile on the scoring path: stored format 3 (binary) against format 1 (JSON), same run.

    .venv/bin/python bench/profile_bench.py [--number 2000] [--repeats 5]

Builds profiles holding 3, 13 and RECENT_LIMIT recent entries (a median customer, the busiest at p99 on the
development data, and a full state), and times encoding, decoding and one scoring step (decode, features,
update, encode) in both formats, median over ``--repeats`` passes of ``--number`` calls. The JSON baseline
writes what earlier versions wrote (and is read by the same ``Profile.from_bytes``, without the hours, places
and locations that format 3 added, so its bytes are fewer than the state it times).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

from posguard_models.features import RECENT_LIMIT, Event, Profile, profile_of


def format_1(profile: Profile) -> bytes:
    """Bytes as earlier versions stored them (the baseline)."""
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


def customer(recent: int) -> Profile:
    """A customer with 200 days of history whose last day holds ``recent`` transactions, at more distinct
    places than the profile keeps (so its place list is full, as a busy customer's is)."""
    days = [day * 86400.0 + 3600.0 for day in range(200)]
    last_day = [200 * 86400.0 + i * (80000.0 / recent) for i in range(recent)]
    times = [1.6e9 + t for t in days + last_day]
    amounts = [12.34 + (i * 7919) % 300 / 7 for i in range(len(times))]
    places = [f"T{(i * 31) % 150}" for i in range(len(times))]
    latitudes = [45.0 + (i % 13) / 100 for i in range(len(times))]
    longitudes = [7.0 + (i % 7) / 100 for i in range(len(times))]
    return profile_of(times, amounts, places, latitudes, longitudes)


def median_us(call: Callable[[], object], number: int, repeats: int) -> float:
    passes = []
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(number):
            call()
        passes.append((time.perf_counter() - began) / number)
    return statistics.median(passes) * 1e6


def measure(
    profile: Profile, stored: bytes, encode: Callable[[Profile], bytes], number: int, repeats: int
) -> list[float]:
    """Median µs of encoding, decoding and one scoring step, in that order."""
    event = Event(profile.last_time + 60.0, 25.0, "T7", 45.05, 7.02)

    def step() -> bytes:
        state = Profile.from_bytes(stored)
        state.features(event)
        state.update(event)
        return encode(state)

    calls: list[Callable[[], object]] = [lambda: encode(profile), lambda: Profile.from_bytes(stored), step]
    return [median_us(call, number, repeats) for call in calls]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    print("| profile | format | bytes | encode µs | decode µs | scoring step µs |")
    print("|---|---|---|---|---|---|")
    formats: list[tuple[str, Callable[[Profile], bytes]]] = [
        ("3 (binary)", Profile.to_bytes),
        ("1 (JSON)", format_1),
    ]
    for recent in (3, 13, RECENT_LIMIT):
        profile = customer(recent)
        for label, encode in formats:
            stored = encode(profile)
            assert Profile.from_bytes(stored).recent == profile.recent

            timings = measure(profile, stored, encode, args.number, args.repeats)
            print(
                f"| {recent} recent | {label} | {len(stored):,} | "
                + " | ".join(f"{t:.1f}" for t in timings)
                + " |"
            )


if __name__ == "__main__":
    main()
