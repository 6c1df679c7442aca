"""The feature vector: one definition for training (batch) and serving (incremental).

Every feature is computed only from the customer's *earlier* transactions, and every feature is
**one-sided**: it is zero (or at its floor) for ordinary and for smaller-than-usual activity and grows only in
the risky direction. An isolation forest isolates both tails of every feature; a purchase much *smaller*
than usual is not a risk, and leaving that tail in made the forest spend half its splits on it (measured: AP
fell from 0.35 to 0.11 on the handbook data). Four features survived measurement on both development
datasets; each one earns its place by what it catches (see docs/risk-model.md):

``amount_above_usual``
    ``ln(1 + amount)`` minus the mean of ``ln(1 + amount)`` over the customer's history, floored at 0.
    ``exp`` of it is "this amount is N times the customer's usual". Catches compromised cards (amounts x5).
``amount_level``
    ``ln(1 + amount)`` floored at ``ln(1 + 50)``: absolute size in major units. Catches large-amount fraud
    whatever the customer's habits, and carries customers without history.
``recent_large_2h``
    Over the customer's transactions in the previous 2 hours: the sum of ``amount_above_usual - 1`` where
    positive. Catches bursts of unusually large purchases, the shape of account takeover.
``spend_24h_above_daily``
    ``ln(1 + spend in the previous 24 h + this amount) - ln(1 + average daily spend)``, floored at 0.

Two implementations share these definitions: :func:`batch_features` (vectorised over a whole history table,
for training) and :class:`Profile` (a small per-customer state updated one transaction at a time, for
serving).
A test checks they agree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

FEATURES: Final[tuple[str, ...]] = (
    "amount_above_usual",
    "amount_level",
    "recent_large_2h",
    "spend_24h_above_daily",
)
# Bumped whenever a definition changes: a model trained on other definitions must not be served.
FEATURE_VERSION: Final = 1

AMOUNT_FLOOR: Final = math.log1p(50.0)
LARGE_MARGIN: Final = (
    1.0  # amount_above_usual beyond which a transaction counts as "large" (e^1 = 2.7x usual)
)
BURST_WINDOW: Final = 2 * 3600.0
SPEND_WINDOW: Final = 24 * 3600.0
DAY: Final = 86400.0

_PROFILE_FORMAT: Final = 1


@dataclass(frozen=True, slots=True)
class Event:
    """What the features need of one transaction: epoch seconds and the amount in major units."""

    time: float
    amount: float


@dataclass(slots=True)
class Profile:
    """One customer's running state: enough to compute the next feature vector without reading history.

    ``recent`` keeps ``(time, amount, above_usual)`` of the last 24 hours only, so the state stays a few
    hundred bytes for ordinary customers whatever their history length.
    """

    count: int = 0
    first_time: float = 0.0
    last_time: float = 0.0
    sum_log_amount: float = 0.0
    total_spend: float = 0.0
    recent: list[tuple[float, float, float]] = field(default_factory=list)

    # -- features -------------------------------------------------------------------------------------

    def above_usual(self, amount: float) -> float:
        if self.count == 0:
            return 0.0
        return max(0.0, math.log1p(amount) - self.sum_log_amount / self.count)

    def features(self, event: Event) -> npt.NDArray[np.float64]:
        """The feature vector of ``event`` against this (earlier) history, in ``FEATURES`` order."""
        log_amount = math.log1p(event.amount)
        # math.fsum (correctly rounded) in both implementations, so they agree whatever the summation order.
        burst = math.fsum(
            max(0.0, above - LARGE_MARGIN)
            for time, _, above in self.recent
            if time >= event.time - BURST_WINDOW
        )
        spend = math.fsum(amount for time, amount, _ in self.recent if time >= event.time - SPEND_WINDOW)
        return np.array(
            [
                self.above_usual(event.amount),
                max(log_amount, AMOUNT_FLOOR),
                burst,
                _spend_feature(
                    spend + event.amount, self.total_spend, self.count, event.time - self.first_time
                ),
            ],
            dtype=np.float64,
        )

    def typical_amount(self) -> float | None:
        """The customer's geometric-mean amount (major units), or None without history."""
        if self.count == 0:
            return None
        return math.expm1(self.sum_log_amount / self.count)

    def recent_large(self, at: float) -> int:
        """How many transactions of the previous 2 hours were unusually large (for explanations)."""
        return sum(1 for time, _, above in self.recent if time >= at - BURST_WINDOW and above > LARGE_MARGIN)

    def spend_ratio(self, event: Event) -> float:
        """Spend over the last 24 h (this one included) as a multiple of the average daily spend."""
        spend = sum(amount for time, amount, _ in self.recent if time >= event.time - SPEND_WINDOW)
        daily = self.total_spend / max((event.time - self.first_time) / DAY, 1.0) if self.count else 0.0
        return (spend + event.amount) / daily if daily > 0 else math.inf

    # -- update ---------------------------------------------------------------------------------------

    def update(self, event: Event) -> None:
        """Fold ``event`` into the state (after its features were taken)."""
        above = self.above_usual(event.amount)
        if self.count == 0:
            self.first_time = event.time
        self.count += 1
        self.last_time = max(self.last_time, event.time)
        self.sum_log_amount += math.log1p(event.amount)
        self.total_spend += event.amount
        self.recent.append((event.time, event.amount, above))
        horizon = self.last_time - SPEND_WINDOW
        self.recent = [entry for entry in self.recent if entry[0] >= horizon]

    # -- storage --------------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        # JSON rather than pickle: the state crosses a database and must never execute anything on load.
        # ``repr`` of a float round-trips exactly, so a stored profile gives bit-identical features.
        return json.dumps(
            {
                "format": _PROFILE_FORMAT,
                "count": self.count,
                "first_time": self.first_time,
                "last_time": self.last_time,
                "sum_log_amount": self.sum_log_amount,
                "total_spend": self.total_spend,
                "recent": self.recent,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Profile:
        try:
            raw = json.loads(data)
            if raw["format"] != _PROFILE_FORMAT:
                raise ValueError(f"unknown profile format {raw['format']!r}")
            recent = [(float(t), float(a), float(u)) for t, a, u in raw["recent"]]
            return cls(
                count=int(raw["count"]),
                first_time=float(raw["first_time"]),
                last_time=float(raw["last_time"]),
                sum_log_amount=float(raw["sum_log_amount"]),
                total_spend=float(raw["total_spend"]),
                recent=recent,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"invalid customer profile: {error}") from error


def _spend_feature(spend_24h: float, total_before: float, count: int, since_first: float) -> float:
    daily = total_before / max(since_first / DAY, 1.0) if count else 0.0
    return max(0.0, math.log1p(spend_24h) - math.log1p(daily))


def batch_features(
    customers: npt.ArrayLike, times: npt.ArrayLike, amounts: npt.ArrayLike
) -> npt.NDArray[np.float64]:
    """Feature matrix of a history table, row for row.

    The rows must be grouped by customer and in time order within each customer (the order the store reads
    them in); each row's features use only the rows before it of the same customer, exactly as the profile
    would have seen them.
    """
    cust = np.asarray(customers)
    t = np.asarray(times, dtype=np.float64)
    amount = np.asarray(amounts, dtype=np.float64)
    n = len(t)
    if not (len(cust) == len(amount) == n):
        raise ValueError("customers, times and amounts must have the same length")
    out = np.zeros((n, len(FEATURES)), dtype=np.float64)
    if n == 0:
        return out
    starts = np.flatnonzero(np.r_[True, cust[1:] != cust[:-1]])
    ends = np.r_[starts[1:], n]
    for start, end in zip(starts, ends, strict=True):
        out[start:end] = _customer_features(t[start:end], amount[start:end])
    return out


def _customer_features(
    t: npt.NDArray[np.float64], amount: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    if np.any(np.diff(t) < 0):
        raise ValueError("rows of a customer must be in time order")
    m = len(t)
    before = np.arange(m)  # rows strictly before each row
    log_amount = _log1p(amount)
    # Running sums, accumulated in the same order as Profile.update so the means match to the last bit.
    sum_log = np.concatenate(([0.0], np.cumsum(log_amount)))[:-1]
    total = np.concatenate(([0.0], np.cumsum(amount)))[:-1]
    mean_log = np.divide(sum_log, before, out=np.zeros(m), where=before > 0)
    above = np.where(before > 0, np.maximum(0.0, log_amount - mean_log), 0.0)

    large = np.maximum(0.0, above - LARGE_MARGIN)
    burst_start = np.searchsorted(t, t - BURST_WINDOW, side="left")
    spend_start = np.searchsorted(t, t - SPEND_WINDOW, side="left")
    burst = _window_sums(large, burst_start)
    spend = _window_sums(amount, spend_start)

    since_first = t - t[0]
    daily = np.where(before > 0, total / np.maximum(since_first / DAY, 1.0), 0.0)
    spend_feature = np.maximum(0.0, _log1p(spend + amount) - _log1p(daily))
    return np.column_stack([above, np.maximum(log_amount, AMOUNT_FLOOR), burst, spend_feature])


def _log1p(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    # The C library's log1p, as the profile uses: numpy's vectorised one can differ in the last bit.
    return np.array([math.log1p(value) for value in values.tolist()], dtype=np.float64)


def _window_sums(
    values: npt.NDArray[np.float64], window_start: npt.NDArray[np.intp]
) -> npt.NDArray[np.float64]:
    """For each row i, the sum of ``values[window_start[i]:i]`` (earlier rows inside the window).

    Summed directly rather than by differences of a cumulative sum: the windows are short, and direct sums
    are what the profile computes, so both paths round alike.
    """
    out = np.zeros(len(values))
    for i, start in enumerate(window_start):
        if start < i:
            out[i] = math.fsum(values[start:i].tolist())
    return out


def profile_of(times: Sequence[float], amounts: Sequence[float]) -> Profile:
    """The profile after a customer's history (time-ordered), as serving would have built it."""
    profile = Profile()
    for time, amount in zip(times, amounts, strict=True):
        profile.update(Event(float(time), float(amount)))
    return profile
