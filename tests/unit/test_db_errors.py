"""Driver exceptions become domain errors on both databases; an SQLite server or command never loads psycopg.

``store.db`` tells psycopg's exception classes apart only once something has loaded psycopg (a PostgreSQL
engine does): until then no exception of those classes can exist, and an embedded deployment does not pay for
importing the driver.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import exc as sa_exc

from posguard_server.domain.errors import AlreadyExists, DeadlineExceeded, Unavailable
from posguard_server.store.db import translate_error

# Runs a command the way ``posguard-server`` does, in this interpreter, then says whether psycopg was loaded.
_COMMAND = """
import runpy, sys
sys.argv = ["posguard-server", *sys.argv[1:]]
try:
    runpy.run_module("posguard_server", run_name="__main__")
except SystemExit as stop:
    assert not stop.code, stop.code
print("psycopg loaded" if "psycopg" in sys.modules else "psycopg not loaded")
"""

# Starts a server on the embedded database as ``serve`` wires it, asks it for its health over gRPC, stops it,
# then the same question.
_SERVER = """
import asyncio, sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from posguard_server.app import build_server
from posguard_server.config import Settings

async def main():
    settings = Settings(
        data_dir=sys.argv[1], listen="127.0.0.1:0", metrics_port=0, console_listen="127.0.0.1:0"
    )
    server, port = build_server(settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    finally:
        await server.stop(None)

asyncio.run(main())
print("psycopg loaded" if "psycopg" in sys.modules else "psycopg not loaded")
"""


def _run(code: str, *args: str, data_dir: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, "POSGUARD_DATA_DIR": str(data_dir)},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_an_sqlite_command_never_loads_psycopg(tmp_path: Path) -> None:
    assert _run(_COMMAND, "keys", "list", data_dir=tmp_path) == "psycopg not loaded"


def test_an_sqlite_server_never_loads_psycopg(tmp_path: Path) -> None:
    assert _run(_SERVER, str(tmp_path), data_dir=tmp_path) == "psycopg not loaded"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (psycopg.IntegrityError("duplicate key"), AlreadyExists),
        (psycopg.errors.UniqueViolation("duplicate key"), AlreadyExists),
        (psycopg.errors.LockNotAvailable("lock timeout"), DeadlineExceeded),
        (psycopg.OperationalError("connection refused"), Unavailable),
        (psycopg.InterfaceError("connection closed"), Unavailable),
        (sa_exc.IntegrityError("INSERT", {}, psycopg.errors.UniqueViolation("duplicate key")), AlreadyExists),
        (sa_exc.OperationalError("SET", {}, psycopg.errors.LockNotAvailable("timeout")), DeadlineExceeded),
        (sqlite3.IntegrityError("UNIQUE constraint failed"), AlreadyExists),
        (sqlite3.OperationalError("disk I/O error"), Unavailable),
    ],
)
def test_driver_exceptions_become_domain_errors(error: BaseException, expected: type[Exception]) -> None:
    assert isinstance(translate_error(error), expected)


@pytest.mark.parametrize(
    "error", [psycopg.errors.SyntaxError("syntax error"), psycopg.DataError("bad value"), ValueError("x")]
)
def test_what_is_not_a_database_condition_is_left_alone(error: BaseException) -> None:
    assert translate_error(error) is None
