"""Reasons: the features that pushed a score most, as sentences with the numbers in them.

A feature is a reason when its value is rarer than ``REASON_RARITY`` of the training rows (the global model
keeps each feature's quantiles). Its weight is its share of the summed surprise ``-ln(rarity)`` of the reasons
shown, so weights add up to 1 and compare across reasons. Terminal evidence from reported fraud is a reason
whenever it raised the score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from posguard_models.features import FEATURES, Event, Profile
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
    for index, name in enumerate(FEATURES):
        if rarity[index] >= REASON_RARITY:
            continue
        surprise = -math.log(max(rarity[index], 1e-9))
        candidates.append((_CODES[name], _sentence(name, rarity[index], profile, event, currency), surprise))
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
}


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
