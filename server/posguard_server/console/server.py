"""Serving the console: uvicorn on a socket of its own, on the event loop the gRPC server runs on.

The socket is bound when the server is built, as the gRPC port is, so a port in use fails the start
before anything serves and port 0 gives the port to report. Only uvicorn's startup and shutdown are used:
its ``serve`` would install signal handlers of its own, and the server's own handlers stop everything.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

log = logging.getLogger(__name__)

# How long open console requests get on shutdown: pages are quick, and the gRPC calls have their own grace.
SHUTDOWN_SECONDS = 2


def bind(listen: str) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one). Raises OSError naming the setting."""
    host, _, port = listen.rpartition(":")
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    try:
        return socket.create_server((bare, int(port)), family=family, backlog=128)
    except OSError as error:
        # The message names the setting's address (cli.serve recognises it); the errno stays the driver's.
        failure = OSError(f"console: cannot listen on {listen}: {error.strerror}")
        failure.errno = error.errno
        raise failure from None


class ConsoleServer:
    def __init__(
        self,
        app: ASGIApp,
        sock: socket.socket,
        *,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        client_ca_file: Path | None = None,
        routes: Sequence[tuple[str, str, str]] = (),
    ) -> None:
        # (method, path, rpc) of every page and action, as the application declares them.
        self.routes = tuple(routes)
        self._sock = sock
        self.host, self.port = sock.getsockname()[:2]
        self.scheme = "https" if cert_file is not None else "http"
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=SHUTDOWN_SECONDS,
            ssl_certfile=cert_file,
            ssl_keyfile=key_file,
            ssl_ca_certs=client_ca_file,
            # With a client CA the console asks for client certificates as the gRPC port does (mTLS).
            ssl_cert_reqs=ssl.CERT_REQUIRED if client_ca_file is not None else ssl.CERT_NONE,
        )
        self._server = uvicorn.Server(config)
        self._started = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in str(self.host) else str(self.host)
        return f"{self.scheme}://{host}:{self.port}/"

    async def start(self) -> None:
        config = self._server.config
        if not config.loaded:
            config.load()
        # What uvicorn's own serve() sets up before startup (lifespan is off: the console has no start hooks).
        self._server.lifespan = config.lifespan_class(config)
        await self._server.startup(sockets=[self._sock])
        self._started = True
        log.info("console on %s", self.url)

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._server.shutdown(sockets=[self._sock])
        else:
            self._sock.close()
