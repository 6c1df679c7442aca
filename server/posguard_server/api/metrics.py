"""Prometheus metrics of the service, on a registry of its own (several servers can live in one process)."""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

log = logging.getLogger(__name__)

# Buckets around a payment authorisation budget: sub-millisecond to a few hundred milliseconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter(
            "posguard_rpc_calls",
            "Finished RPCs by method and status code.",
            ("method", "code"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "posguard_rpc_latency_seconds",
            "Time from receiving an RPC to its status, by method and status code.",
            ("method", "code"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.calls.labels(method, code).inc()
        self.latency.labels(method, code).observe(seconds)

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
