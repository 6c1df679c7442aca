"""Metrics kept as plain tallies (calls and latencies, scores), read as Prometheus would read them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from posguard_server.api.metrics import LATENCY_BUCKETS, SCORE_BUCKETS, Metrics


def _samples(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == name
    }


def test_the_tallies_read_as_a_prometheus_counter_and_histogram_fed_the_same_calls() -> None:
    metrics = Metrics()
    reference = CollectorRegistry()
    histogram = Histogram(
        "posguard_rpc_latency_seconds", "", ("method", "code"), buckets=LATENCY_BUCKETS, registry=reference
    )
    # On the bounds (a bound is inclusive), between them, beyond the last one, and zero.
    latencies = [0.0, 0.0005, 0.00051, 0.001, 0.0499, 0.05, 2.5, 5.0, 5.01, 30.0]
    for code in ("OK", "NOT_FOUND"):
        tally = metrics.rpc_tally("/posguard.v1.CustomerIds/VerifyCustomerId", code)
        assert metrics.rpc_tally("/posguard.v1.CustomerIds/VerifyCustomerId", code) is tally  # bound once
        for seconds in latencies if code == "OK" else latencies[:3]:
            tally.observe(seconds)
            histogram.labels("/posguard.v1.CustomerIds/VerifyCustomerId", code).observe(seconds)
    for suffix in ("_bucket", "_count", "_sum"):
        name = "posguard_rpc_latency_seconds" + suffix
        assert _samples(metrics.registry, name) == _samples(reference, name), suffix
    calls = _samples(metrics.registry, "posguard_rpc_calls_total")
    method = ("method", "/posguard.v1.CustomerIds/VerifyCustomerId")
    assert calls == {(("code", "NOT_FOUND"), method): 3.0, (("code", "OK"), method): 10.0}


def test_the_score_tallies_read_as_the_prometheus_histogram_and_counters_fed_the_same_scores() -> None:
    metrics = Metrics()
    reference = CollectorRegistry()
    scores = Histogram("posguard_risk_score", "", ("scope",), buckets=SCORE_BUCKETS, registry=reference)
    decisions = Counter("posguard_risk_decisions", "", ("decision", "scope"), registry=reference)
    models = Counter("posguard_risk_model_scores", "", ("scope", "version"), registry=reference)
    # Several decisions and versions of one scope share its histogram; a rule decision has no version ("-").
    scored = [
        (0.1, "APPROVE", "CUSTOMER", "c-1"),
        (0.5, "APPROVE", "CUSTOMER", "c-2"),
        (0.995, "REVIEW", "CUSTOMER", "c-1"),
        (0.99991, "DECLINE", "GLOBAL", "g-7"),
        (1.0, "DECLINE", "GLOBAL", "g-7"),
        (0.0, "REVIEW", "NONE", ""),
        (0.97, "APPROVE", "GLOBAL", "g-8"),
    ]
    for score, decision, scope, version in scored:
        metrics.observe_score(score, decision, scope, version)
        scores.labels(scope).observe(score)
        decisions.labels(decision, scope).inc()
        models.labels(scope, version or "-").inc()
    for name in (
        "posguard_risk_score_bucket",
        "posguard_risk_score_count",
        "posguard_risk_score_sum",
        "posguard_risk_decisions_total",
        "posguard_risk_model_scores_total",
    ):
        assert _samples(metrics.registry, name) == _samples(reference, name), name
    assert _samples(metrics.registry, "posguard_risk_score_count") == {
        (("scope", "CUSTOMER"),): 3.0,
        (("scope", "GLOBAL"),): 3.0,
        (("scope", "NONE"),): 1.0,
    }
