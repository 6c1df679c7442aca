"""The /metrics endpoint: Prometheus's WSGI app on a small HTTP server with a thread of its own.

``prometheus_client.start_http_server`` runs the same app, but its thread looks for a stop request only every
half second, and ``stop`` waits for it: every server's stop (a test server's, a worker's at shutdown) took
0.3–0.5 s there, on the event loop. Here the thread looks every ``_STOP_POLL_SECONDS``.
"""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

# Short enough for a quick stop; long enough that an idle endpoint wakes its thread only 20 times a second.
_STOP_POLL_SECONDS = 0.05


class _Server(ThreadingMixIn, WSGIServer):
    # A scrape in progress does not hold the process up at exit.
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged: the access log is for the service's own calls."""


class MetricsEndpoint:
    """Serves ``registry`` at http://host:port/metrics from ``start`` until ``stop``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._running: tuple[WSGIServer, threading.Thread] | None = None

    def start(self, host: str, port: int) -> int:
        """Listen and serve; returns the port it listens on (the one chosen when ``port`` is 0)."""
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server_class = _Server6 if family == socket.AF_INET6 else _Server
        server = make_server(
            host, port, make_wsgi_app(self._registry), server_class, handler_class=_QuietHandler
        )
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": _STOP_POLL_SECONDS},
            name="posguard-metrics",
            daemon=True,
        )
        thread.start()
        self._running = server, thread
        return int(server.server_port)

    def stop(self) -> None:
        """Stop serving and close the socket; a no-op when not started."""
        if self._running is not None:
            server, thread = self._running
            self._running = None
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
