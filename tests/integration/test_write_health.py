"""Health tells the truth about writes: while the database takes none, the services report NOT_SERVING.

A real ``posguard-server serve`` process on each backend, and a real failure of its storage:

- SQLite: the disk is full for the server process (its file size limit drops to one byte, so SQLite's
  writes fail with "database or disk is full" or an I/O error, as on a full disk);
- PostgreSQL: the database goes away (it stops taking connections and the server's are cut).

The server first notices on its own, with no calls (its write probe), then a call fails UNAVAILABLE; once
storage is back, health returns to SERVING without any call, and calls succeed again.
"""

from __future__ import annotations

import contextlib
import resource
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

import posguard

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Cli, ServeProcess

SERVICES = ("posguard.v1.CustomerIds", "posguard.v1.Risk", "posguard.v1.Admin")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PROBE_SECONDS = 0.2


def statuses(target: str) -> dict[str, int]:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return {
            name: int(stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status)
            for name in ("", *SERVICES)
        }


def wait_for(target: str, status: int) -> dict[str, int]:
    """Until every service reports ``status``; the server as a whole ("") stays SERVING throughout."""
    give_up = time.monotonic() + 60
    while True:
        now = statuses(target)
        assert now[""] == SERVING, now
        if all(now[name] == status for name in SERVICES):
            return now
        assert time.monotonic() < give_up, f"health never became {status}: {now}"
        time.sleep(0.1)


@contextmanager
def disk_full(process: subprocess.Popen[str]) -> Iterator[None]:
    """The server process may not grow any file past one byte: every write of SQLite fails."""
    soft, hard = resource.prlimit(process.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (1, hard))
    try:
        yield
    finally:
        resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (soft, hard))


@contextmanager
def database_gone(url: str) -> Iterator[None]:
    """The server's PostgreSQL database takes no connections and the open ones are cut."""
    name = make_url(url).database
    admin = (
        make_url(url).set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    )
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        try:
            yield
        finally:
            connection.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


class Drain:
    """Reads the server's log on a thread, so that a full pipe never blocks it."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        self._stream = process.stderr
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            self.lines.append(line)


def test_while_writes_fail_the_services_report_not_serving_until_writes_work_again(
    database_url: str, tmp_path: Path, serve_process: ServeProcess, cli: Cli
) -> None:
    flags = ("--database-url", database_url, "--health-probe-seconds", str(PROBE_SECONDS))
    assert cli("--data-dir", str(tmp_path), *flags, "db", "upgrade").returncode == 0
    created = cli("--data-dir", str(tmp_path), *flags, "keys", "create", "--role", "admin")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    process, port = serve_process(tmp_path, *flags, "--auth-cache-seconds", "600")
    log = Drain(process)
    target = f"127.0.0.1:{port}"
    failing: contextlib.AbstractContextManager[None] = (
        disk_full(process) if database_url.startswith("sqlite") else database_gone(database_url)
    )
    with posguard.Client(target, api_key=token, timeout=15) as client:
        client.issue_customer_id()  # the key is checked (and cached) while the database works
        assert statuses(target) == dict.fromkeys(("", *SERVICES), SERVING)

        with failing:
            wait_for(target, NOT_SERVING)  # the probe found out, without a call
            with pytest.raises(posguard.UnavailableError):
                client.issue_customer_id()
            assert all(statuses(target)[name] == NOT_SERVING for name in SERVICES)
        wait_for(target, SERVING)  # the probe found out again, without a call
        assert client.issue_customer_id().customer.primary.number
    warnings = [line for line in log.lines if "writes to the database" in line]
    assert len(warnings) == 2, warnings  # once per change, not per failed write
    assert "fail" in warnings[0]
    assert "work again" in warnings[1]
