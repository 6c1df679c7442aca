"""The RPC call counter and latency histogram, kept as plain tallies, read as Prometheus would read them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from posguard_server.api.metrics import LATENCY_BUCKETS, Metrics


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
