"""The overview's live figures, read from the server's own Prometheus registry.

Counters only grow, so rates come from differences between readings: each reading is kept for
``WINDOW_SECONDS`` and a rate is the growth since the oldest kept reading, divided by the time between them.
Latency percentiles are read from the histogram's buckets over the same window (since the start while the
window has no call), interpolating linearly inside a bucket as Prometheus' ``histogram_quantile`` does.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

WINDOW_SECONDS = 10.0
PERCENTILES = (0.5, 0.95, 0.99)
_CALLS = "posguard_rpc_calls_total"
_SHED = "posguard_rpc_shed_total"
_DECISIONS = "posguard_risk_decisions_total"
_LATENCY_BUCKET = "posguard_rpc_latency_seconds_bucket"


@dataclass(frozen=True, slots=True)
class Reading:
    at: float
    calls: float
    shed: float
    decisions: Mapping[str, float]
    buckets: Mapping[float, float]  # upper bound -> cumulative count, over every method and code


@dataclass(frozen=True, slots=True)
class LiveFigures:
    calls_per_second: float
    shed_per_second: float
    calls_total: int
    shed_total: int
    decisions: Mapping[str, int]  # since the start, by decision
    latency_ms: Mapping[str, float | None]  # "p50", "p95", "p99"
    latency_window: str  # "last 10 s" or "since start"


def read(registry: CollectorRegistry, at: float) -> Reading:
    calls = shed = 0.0
    decisions: dict[str, float] = {}
    buckets: dict[float, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == _CALLS:
                calls += sample.value
            elif sample.name == _SHED:
                shed += sample.value
            elif sample.name == _DECISIONS:
                decision = sample.labels.get("decision", "")
                decisions[decision] = decisions.get(decision, 0.0) + sample.value
            elif sample.name == _LATENCY_BUCKET:
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return Reading(at, calls, shed, decisions, buckets)


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q`` quantile of a cumulative histogram (None when it counted nothing)."""
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):  # beyond the last finite bucket: its lower edge is all one can say
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return bounds[-1]


class LiveStats:
    """Readings of one registry over a sliding window (shared by every session: one reading per poll)."""

    def __init__(self, registry: CollectorRegistry, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = registry
        self._clock = clock
        self._readings: deque[Reading] = deque()
        self._lock = threading.Lock()

    def figures(self) -> LiveFigures:
        now = self._clock()
        current = read(self._registry, now)
        with self._lock:
            while self._readings and now - self._readings[0].at > WINDOW_SECONDS:
                self._readings.popleft()
            oldest = self._readings[0] if self._readings else None
            self._readings.append(current)
        calls_rate = shed_rate = 0.0
        window_buckets: dict[float, float] = {}
        if oldest is not None and current.at > oldest.at:
            elapsed = current.at - oldest.at
            calls_rate = (current.calls - oldest.calls) / elapsed
            shed_rate = (current.shed - oldest.shed) / elapsed
            window_buckets = {b: c - oldest.buckets.get(b, 0.0) for b, c in current.buckets.items()}
        in_window = bool(window_buckets) and max(window_buckets.values()) > 0
        buckets = window_buckets if in_window else dict(current.buckets)
        latency: dict[str, float | None] = {}
        for q in PERCENTILES:
            value = quantile(q, buckets)
            latency[f"p{round(q * 100)}"] = None if value is None else value * 1000
        return LiveFigures(
            calls_per_second=max(calls_rate, 0.0),
            shed_per_second=max(shed_rate, 0.0),
            calls_total=round(current.calls),
            shed_total=round(current.shed),
            decisions={k: round(v) for k, v in sorted(current.decisions.items())},
            latency_ms=latency,
            latency_window=f"last {WINDOW_SECONDS:.0f} s" if in_window else "since start",
        )
