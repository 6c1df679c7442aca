"""Prometheus metrics of the service, on a registry of its own (several servers can live in one process)."""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from posguard_server.api.metrics_endpoint import MetricsEndpoint

log = logging.getLogger(__name__)

# Buckets around a payment authorisation budget: sub-millisecond to a few hundred milliseconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Scores are calibrated so 1 - score is an alert rate: the interesting resolution is in the top percent.
SCORE_BUCKETS = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 1.0)
# The parts whose failure posguard_degraded reports (api.health).
DEGRADED_COMPONENTS = ("storage", "risk_model")


class Tally:
    """Observations of one labelled series: how many fell in each bucket of ``bounds``, and their sum.

    Plain numbers, written by the event loop that serves the calls (the only writer) and read when scraped:
    an observation costs one bisection and two additions, where a prometheus_client counter and histogram cost
    two locks, a bucket walk and their checks. The collectors below expose tallies as counters and histograms.
    """

    __slots__ = ("bounds", "buckets", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)  # the last: beyond every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.buckets[bisect_left(self.bounds, value)] += 1  # bounds are inclusive, as Prometheus's
        self.sum += value

    def read(self) -> tuple[list[int], float]:
        """The buckets (each with those below it, as Prometheus counts them) and the sum, as of now.

        The event loop may count meanwhile: the buckets are copied at once, so they and the count agree (the
        sum, read next, may include an observation more).
        """
        return list(accumulate(list(self.buckets))), self.sum


def _labels(bounds: tuple[float, ...]) -> tuple[str, ...]:
    return (*map(floatToGoString, bounds), "+Inf")  # as prometheus_client writes them


_LATENCY_LABELS = _labels(LATENCY_BUCKETS)
_SCORE_LABELS = _labels(SCORE_BUCKETS)


class _RpcCollector(Collector):
    """``posguard_rpc_calls`` and ``posguard_rpc_latency_seconds``: the tallies as they are when scraped."""

    def __init__(self, tallies: dict[tuple[str, str], Tally]) -> None:
        self._tallies = tallies

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "posguard_rpc_calls", "Finished RPCs by method and status code.", labels=("method", "code")
        )
        latency = HistogramMetricFamily(
            "posguard_rpc_latency_seconds",
            "Time from receiving an RPC to its status, by method and status code.",
            labels=("method", "code"),
        )
        for (method, code), tally in list(self._tallies.items()):
            cumulative, total = tally.read()
            calls.add_metric([method, code], cumulative[-1])
            latency.add_metric([method, code], list(zip(_LATENCY_LABELS, cumulative, strict=True)), total)
        yield calls
        yield latency


class _ScoreCollector(Collector):
    """``posguard_risk_score``, ``posguard_risk_decisions`` and ``posguard_risk_model_scores``: one tally a
    decision, model scope and version, summed over the labels each metric leaves out when scraped."""

    def __init__(self, tallies: dict[tuple[str, str, str], Tally]) -> None:
        self._tallies = tallies

    def collect(self) -> Iterator[Metric]:
        by_scope: dict[str, tuple[list[int], float]] = {}
        by_decision: dict[tuple[str, str], int] = {}
        by_model: dict[tuple[str, str], int] = {}
        for (decision, scope, version), tally in list(self._tallies.items()):
            cumulative, total = tally.read()
            buckets, scope_total = by_scope.get(scope, ([0] * len(cumulative), 0.0))
            by_scope[scope] = ([a + b for a, b in zip(buckets, cumulative, strict=True)], scope_total + total)
            by_decision[decision, scope] = by_decision.get((decision, scope), 0) + cumulative[-1]
            model = (scope, version or "-")
            by_model[model] = by_model.get(model, 0) + cumulative[-1]
        scores = HistogramMetricFamily(
            "posguard_risk_score",
            "risk_score of newly scored transactions (not replays), by model scope.",
            labels=("scope",),
        )
        for scope, (buckets, total) in by_scope.items():
            scores.add_metric([scope], list(zip(_SCORE_LABELS, buckets, strict=True)), total)
        decisions = CounterMetricFamily(
            "posguard_risk_decisions",
            "Newly scored transactions by decision and model scope.",
            labels=("decision", "scope"),
        )
        for labels, count in by_decision.items():
            decisions.add_metric(list(labels), count)
        models = CounterMetricFamily(
            "posguard_risk_model_scores",
            "Newly scored transactions by the model (scope and version) that decided: the versions in use.",
            labels=("scope", "version"),
        )
        for labels, count in by_model.items():
            models.add_metric(list(labels), count)
        yield scores
        yield decisions
        yield models


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._rpc_tallies: dict[tuple[str, str], Tally] = {}
        self.registry.register(_RpcCollector(self._rpc_tallies))
        self._score_tallies: dict[tuple[str, str, str], Tally] = {}
        self.registry.register(_ScoreCollector(self._score_tallies))
        self.in_progress = Gauge(
            "posguard_rpc_in_progress",
            "Calls being worked on by admission class (gateway, admin): health checks and calls waiting for "
            "their API key to be checked excepted; a stream counts while transactions of it are scored.",
            ("admission",),
            registry=self.registry,
        )
        self.shed = Counter(
            "posguard_rpc_shed",
            "Calls refused with RESOURCE_EXHAUSTED because the server was at capacity, by method.",
            ("method",),
            registry=self.registry,
        )
        self.guesses = Counter(
            "posguard_guesses",
            "Calls naming a customer, number, external id or dynamic code that does not exist, counted "
            "against the caller's failure limit, by method.",
            ("method",),
            registry=self.registry,
        )
        self.guess_spikes = Counter(
            "posguard_guess_spikes",
            "Times the guesses across all keys crossed guess_spike_limit within a minute.",
            registry=self.registry,
        )
        self.degraded = Gauge(
            "posguard_degraded",
            "1 while a part the server needs fails: storage (writes to the database fail) or risk_model (a "
            "global model is active but none is usable: answers are the no-model decision).",
            ("component",),
            registry=self.registry,
        )
        for component in DEGRADED_COMPONENTS:
            self.degraded.labels(component).set(0)
        self.model_load_failures = Counter(
            "posguard_risk_model_load_failures",
            "Models that could not be loaded (checksum mismatch or any failure while loading), by kind: "
            "global, customer or shadow.",
            ("kind",),
            registry=self.registry,
        )
        self._endpoint = MetricsEndpoint(self.registry)

    def rpc_tally(self, method: str, code: str) -> Tally:
        """The tally of one method's calls that ended with ``code``, to bind once and count calls in."""
        tally = self._rpc_tallies.get((method, code))
        if tally is None:
            tally = self._rpc_tallies[method, code] = Tally(LATENCY_BUCKETS)
        return tally

    def observe_score(self, score: float, decision: str, scope: str, version: str) -> None:
        """Count one newly scored transaction (a replayed answer is not a new decision)."""
        tally = self._score_tallies.get((decision, scope, version))
        if tally is None:  # a handful: decisions x scopes x active versions
            tally = self._score_tallies[decision, scope, version] = Tally(SCORE_BUCKETS)
        tally.observe(score)

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics endpoint; returns the port it listens on."""
        bound = self._endpoint.start(host, port)
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def stop_http(self) -> None:
        self._endpoint.stop()
