"""Reasons: the features that pushed a score most, as sentences with the numbers in them.

A core feature is a reason when its value is rarer than ``REASON_RARITY`` of the training rows (the global
model keeps each feature's quantiles). A group's signal (an unusual hour, a new or distant place) is a reason
only when its group forest raised the score and the signal is present; its sentence names the group. The
weight of a reason is its share of the summed surprise ``-ln(share of training rows reaching its value)`` of
the reasons shown, so weights add up to 1 and compare across reasons. Terminal evidence from reported fraud
is a reason whenever it raised the score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from posguard_models.features import (
    CORE_FEATURES,
    FEATURE_GROUPS,
    FEATURES,
    PLACE_LIMIT,
    Event,
    Profile,
    hour_of,
)
from posguard_models.model import GlobalModel, Score

REASON_RARITY: Final = 0.05
MAX_REASONS: Final = 3


@dataclass(frozen=True, slots=True)
class Reason:
    code: str
    message: str
    weight: float


def explain(
    model: GlobalModel,
    x: npt.NDArray[np.float64],
    score: Score,
    profile: Profile,
    event: Event,
    *,
    currency: str,
    terminal: tuple[int, int] | None = None,
    window_days: float | None = None,
    rarity: npt.NDArray[np.float64] | None = None,
) -> list[Reason]:
    """Up to three reasons, strongest first. ``rarity``: ``model.rarity(x)``, when already computed."""
    if rarity is None:
        rarity = model.rarity(x)
    candidates: list[tuple[str, str, float]] = []
    for index, name in enumerate(CORE_FEATURES):
        if rarity[index] >= REASON_RARITY:
            continue
        surprise = -math.log(max(rarity[index], 1e-9))
        candidates.append((_CODES[name], _sentence(name, rarity[index], profile, event, currency), surprise))
    for group, _ in score.groups:
        # The signals of a group that raised the score, where present (its amount features speak as core
        # reasons), weighed like core features by how few training rows reach their value, so they compare.
        for name in _SIGNALS[group]:
            index = FEATURES.index(name)
            if x[index] > 0:
                share = model.share_at_or_above(index, float(x[index]))
                sentence = f"{_GROUP_WORDS[group]}: {_habit(name, profile, event)}"
                candidates.append((_CODES[name], sentence, -math.log(max(share, 1e-9))))
    if score.evidence > 0 and terminal is not None:
        frauds, customers = terminal
        days = f"{window_days:g}" if window_days is not None else "recent"
        candidates.append(
            (
                "TERMINAL_REPORTED_FRAUD",
                f"fraud was reported for {frauds} of {customers} customers at this terminal "
                f"in the last {days} days",
                score.evidence,
            )
        )
    candidates.sort(key=lambda c: -c[2])
    shown = candidates[:MAX_REASONS]
    total = sum(c[2] for c in shown)
    return [Reason(code, message, round(surprise / total, 4)) for code, message, surprise in shown]


_CODES: Final = {
    "amount_above_usual": "AMOUNT_ABOVE_USUAL",
    "amount_level": "LARGE_AMOUNT",
    "recent_large_2h": "BURST_OF_LARGE_AMOUNTS",
    "spend_24h_above_daily": "HIGH_DAILY_SPEND",
    "hour_unusual": "UNUSUAL_HOUR",
    "new_place": "NEW_TERMINAL",
    "distance_above_usual": "FAR_FROM_USUAL_PLACES",
}
# Per group, its own signals (every group also sees the two amount features).
_SIGNALS: Final = {name: [f for f in features if f not in CORE_FEATURES] for name, features in FEATURE_GROUPS}
_GROUP_WORDS: Final = {"time": "time of day", "place": "place"}


def _habit(name: str, profile: Profile, event: Event) -> str:
    if name == "hour_unusual":
        near, known = profile.hour_share(event.time)
        hour = hour_of(event.time)
        return (
            f"{near} of this customer's {known} earlier transactions were within an hour of {hour:02d}:00 UTC"
        )
    if name == "new_place":
        where = "terminal" if event.at_terminal else "merchant"
        if len(profile.places) < PLACE_LIMIT:
            return f"{where} never used by this customer"
        return f"{where} not among the {PLACE_LIMIT} places this customer used last"
    if name == "distance_above_usual":
        km = profile.distance_km(event)
        return (
            f"{km:,.0f} km from this customer's usual places" if km is not None else "far from usual places"
        )
    raise KeyError(name)


def _money(amount: float, currency: str) -> str:
    return f"{amount:,.2f} {currency}"


def _sentence(name: str, rarity: float, profile: Profile, event: Event, currency: str) -> str:
    if name == "amount_above_usual":
        usual = profile.typical_amount() or 0.0
        ratio = (1 + event.amount) / (1 + usual)
        usual_text = _money(usual, currency)
        return f"amount {_money(event.amount, currency)} is {ratio:.1f}x this customer's usual ({usual_text})"
    if name == "amount_level":
        share = 100.0 * (1.0 - rarity)
        return f"amount {_money(event.amount, currency)} is larger than {share:.1f}% of transactions"
    if name == "recent_large_2h":
        count = profile.recent_large(event.time)
        return f"{count} unusually large transactions by this customer in the previous 2 hours"
    if name == "spend_24h_above_daily":
        ratio = profile.spend_ratio(event)
        if math.isinf(ratio):
            return (
                f"{_money(event.amount, currency)} spent within 24 hours of this customer's first transaction"
            )
        return f"spend in the last 24 hours is {ratio:.1f}x this customer's daily average"
    raise KeyError(name)
