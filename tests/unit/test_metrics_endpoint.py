"""The /metrics endpoint on its own: what it serves, on IPv4 and IPv6, and that a stop frees its port."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from posguard_server.api.metrics_endpoint import MetricsEndpoint


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("posguard_endpoint_test", "A counter of this test.", registry=registry).inc(3)
    return registry


@pytest.mark.parametrize(("host", "url_host"), [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")])
def test_serves_its_registry_and_frees_the_port_when_stopped(host: str, url_host: str) -> None:
    endpoint = MetricsEndpoint(_registry())
    port = endpoint.start(host, 0)
    try:
        with urllib.request.urlopen(f"http://{url_host}:{port}/metrics", timeout=5) as page:
            assert page.status == 200
            assert "posguard_endpoint_test_total 3.0" in page.read().decode()
    finally:
        endpoint.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://{url_host}:{port}/metrics", timeout=5)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as again:  # nothing listens there: the port can be listened on again
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the closed scrape's TIME_WAIT
        again.bind((host, port))
        again.listen()
    endpoint.stop()  # a second stop changes nothing


def test_a_port_in_use_is_refused_with_the_system_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="in use"):
            MetricsEndpoint(_registry()).start("127.0.0.1", taken.getsockname()[1])
