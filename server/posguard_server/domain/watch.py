"""The number watch's detector: is a number's use in one window abnormal for itself and for the population?

Each window (the time since the watch last looked) gives every number in use five counts: verifications,
failed verifications, transactions, refused dynamic codes and distinct merchants. A count is abnormal when all
three hold, so that every flag can be explained in one sentence:

- it is at least ``min_events`` (a handful of events is never a pattern);
- it is at least ``own_ratio`` times the number's own usual count per window (an exponentially weighted
  mean of its earlier windows; 1 for a number never seen before);
- it is at least ``population_ratio`` times the median count of the *other* numbers in use in the window
  (1 when there are none), so a busy hour for everyone flags no one.

A number with at least one abnormal count is flagged, with one reason per abnormal count.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass

from posguard_server.domain.risk import StoredReason

SIGNALS = ("verifications", "failed_verifications", "transactions", "refused_codes", "merchants")
_WORDS = {
    "verifications": "verifications",
    "failed_verifications": "failed verifications",
    "transactions": "transactions",
    "refused_codes": "refused dynamic codes",
    "merchants": "distinct merchants",
}
# How much one window moves a number's usual count: about the last ten windows count.
BASELINE_WEIGHT = 0.2

Counts = Mapping[str, float]  # signal → count in the window (or usual count per window)


@dataclass(frozen=True, slots=True)
class Thresholds:
    min_events: int
    own_ratio: float
    population_ratio: float


def code(signal: str) -> str:
    return "WATCH_" + signal.upper()


def judge(
    window: Mapping[str, Counts],
    usual: Mapping[str, Counts],
    thresholds: Thresholds,
    *,
    window_words: str,
) -> dict[str, tuple[StoredReason, ...]]:
    """The numbers flagged in ``window`` (number → counts), with why, strongest first.

    ``usual`` holds the numbers' usual counts per window (a number missing from it was never seen before).
    ``window_words`` says how long the window was, for the reasons' messages ("in 60 s").
    """
    flagged: dict[str, tuple[StoredReason, ...]] = {}
    columns = {signal: sorted(counts.get(signal, 0.0) for counts in window.values()) for signal in SIGNALS}
    for number, counts in window.items():
        reasons: list[tuple[float, str, str]] = []
        for signal in SIGNALS:
            value = counts.get(signal, 0.0)
            if value < thresholds.min_events:
                continue
            own = usual.get(number, {}).get(signal, 0.0)
            if value < thresholds.own_ratio * max(own, 1.0):
                continue
            others = _median_without(columns[signal], value)
            if value < thresholds.population_ratio * max(others, 1.0):
                continue
            strength = min(value / max(own, 1.0), value / max(others, 1.0))
            message = (
                f"{value:g} {_WORDS[signal]} {window_words}: {value / max(own, 1.0):.1f}x this number's "
                f"usual {own:.1f}, {value / max(others, 1.0):.1f}x the median {others:g} of the other "
                "numbers in use"
            )
            reasons.append((strength, code(signal), message))
        if reasons:
            reasons.sort(reverse=True)
            top = reasons[0][0]
            flagged[number] = tuple(StoredReason(c, m, round(s / top, 3)) for s, c, m in reasons)
    return flagged


def next_usual(usual: Counts | None, window: Counts) -> dict[str, float]:
    """A number's usual counts moved on by one window it was in use in."""
    if usual is None:
        return {signal: float(window.get(signal, 0.0)) for signal in SIGNALS}
    return {
        signal: (1 - BASELINE_WEIGHT) * usual.get(signal, 0.0) + BASELINE_WEIGHT * window.get(signal, 0.0)
        for signal in SIGNALS
    }


def _median_without(values: list[float], value: float) -> float:
    """The median of sorted ``values`` with one occurrence of ``value`` left out; 0 when nothing is left."""
    if len(values) <= 1:
        return 0.0
    rest = list(values)
    rest.remove(value)
    return float(statistics.median(rest))
