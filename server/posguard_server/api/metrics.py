"""Prometheus metrics of the service, on a registry of its own (several servers can live in one process)."""

from __future__ import annotations

import logging
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator
from itertools import accumulate
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

# Buckets around a payment authorisation budget: sub-millisecond to a few hundred milliseconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Scores are calibrated so 1 - score is an alert rate: the interesting resolution is in the top percent.
SCORE_BUCKETS = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 1.0)
# The parts whose failure posguard_degraded reports (api.health).
DEGRADED_COMPONENTS = ("storage", "risk_model")


class RpcTally:
    """The finished calls of one method with one status code: how many ended in each latency bucket, and the
    sum of their latencies.

    Plain numbers, written by the event loop that serves the calls (the only writer) and read when scraped
    (:class:`_RpcCollector`): a call costs one bisection and two additions, where a prometheus_client counter
    and histogram cost two locks, a bucket walk and their checks. These are ``posguard_rpc_calls`` and
    ``posguard_rpc_latency_seconds``, exposed as a counter and a histogram.
    """

    __slots__ = ("buckets", "seconds")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last: beyond every bound
        self.seconds = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # bounds are inclusive, as Prometheus's
        self.seconds += seconds


_LATENCY_LABELS = (*map(floatToGoString, LATENCY_BUCKETS), "+Inf")  # as prometheus_client writes them


class _RpcCollector(Collector):
    """``posguard_rpc_calls`` and ``posguard_rpc_latency_seconds``: the tallies as they are when scraped."""

    def __init__(self, tallies: dict[tuple[str, str], RpcTally]) -> None:
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
            # The event loop may count a call meanwhile: the buckets are copied at once, so they and the count
            # agree (the sum, read next, may include a call more).
            cumulative = list(zip(_LATENCY_LABELS, accumulate(list(tally.buckets)), strict=True))
            calls.add_metric([method, code], cumulative[-1][1])
            latency.add_metric([method, code], cumulative, tally.seconds)
        yield calls
        yield latency


# A scored transaction's three metric children: score histogram, decision counter, model counter.
_ScoreChildren = tuple[Callable[[float], None], Callable[[], None], Callable[[], None]]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._rpc_tallies: dict[tuple[str, str], RpcTally] = {}
        self.registry.register(_RpcCollector(self._rpc_tallies))
        self.scores = Histogram(
            "posguard_risk_score",
            "risk_score of newly scored transactions (not replays), by model scope.",
            ("scope",),
            buckets=SCORE_BUCKETS,
            registry=self.registry,
        )
        self.decisions = Counter(
            "posguard_risk_decisions",
            "Newly scored transactions by decision and model scope.",
            ("decision", "scope"),
            registry=self.registry,
        )
        self.models = Counter(
            "posguard_risk_model_scores",
            "Newly scored transactions by the model (scope and version) that decided: the versions in use.",
            ("scope", "version"),
            registry=self.registry,
        )
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
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        self._score_children: dict[tuple[str, str, str], _ScoreChildren] = {}

    def rpc_tally(self, method: str, code: str) -> RpcTally:
        """The tally of one method's calls that ended with ``code``, to bind once and count calls in."""
        tally = self._rpc_tallies.get((method, code))
        if tally is None:
            tally = self._rpc_tallies[method, code] = RpcTally()
        return tally

    def observe_score(self, score: float, decision: str, scope: str, version: str) -> None:
        """Count one newly scored transaction (a replayed answer is not a new decision)."""
        key = (decision, scope, version)
        children = self._score_children.get(key)
        if children is None:
            # Bound once per combination (a handful: decisions x scopes x active versions): ``labels`` looks
            # its child up under a lock on every call.
            children = self._score_children[key] = (
                self.scores.labels(scope).observe,
                self.decisions.labels(decision, scope).inc,
                self.models.labels(scope, version or "-").inc,
            )
        observe, count_decision, count_model = children
        observe(score)
        count_decision()
        count_model()

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics endpoint; returns the port it listens on."""
        self._http = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http[0].server_port)
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def stop_http(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._http = None
