"""Checking, before a server starts, that its ports are free: a port in use is one line and exit status 2.

Without the check, gRPC reports a taken port from its C core (a log line of its own, then a bare
"Failed to bind") and the metrics endpoint fails only after the gRPC server started, with a traceback.
The check can race with another process taking the port a moment later; that rare case still fails, less
tidily, in the server itself.
"""

from __future__ import annotations

import errno
import os
import socket

from posguard_server.cli.exit_codes import ConfigurationError
from posguard_server.cli.settings_flags import env_of
from posguard_server.config import Settings


def check_ports_free(settings: Settings) -> None:
    """Raise :class:`ConfigurationError` naming the first listen, metrics or console port not free."""
    host, _, port = settings.listen.rpartition(":")
    _check(host, int(port), "listen")
    if settings.metrics_enabled and settings.metrics_port:
        for index in range(settings.workers):  # worker i serves metrics on metrics_port + i
            _check(settings.metrics_host, settings.metrics_port + index, "metrics_port", index)
    if settings.console_enabled:
        host, _, port = settings.console_listen.rpartition(":")
        _check(host, int(port), "console_listen")


def cannot_listen(address: str, setting: str, reason: str, worker: int = 0) -> ConfigurationError:
    """The one line a server leaves with when it cannot listen on ``address``."""
    which = f"setting {setting} / {env_of(setting)}"
    if worker:
        which += f", plus {worker} for worker {worker}"
    return ConfigurationError(f"cannot listen on {address} ({which}): {reason}")


def _check(host: str, port: int, setting: str, worker: int = 0) -> None:
    if port == 0:  # a free port is picked when binding
        return
    bare = host.strip("[]")
    address = f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"
    try:
        candidates = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise cannot_listen(address, setting, f"unknown host ({error.strerror})", worker) from None
    problem: OSError | None = None
    for family, kind, proto, _, sockaddr in candidates:
        with socket.socket(family, kind, proto) as probe:
            # As the servers bind: SO_REUSEADDR, so a port left in TIME_WAIT by a stopped server is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as error:
                problem = problem or error
                continue
        return  # gRPC serves when it can bind any of the addresses a host name resolves to
    if problem is not None:
        reason = os.strerror(problem.errno or errno.EADDRINUSE).lower()
        raise cannot_listen(address, setting, reason, worker)
