"""``posguard-server`` as an operator runs it: a real process, real signals, real databases."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import posguard

if TYPE_CHECKING:
    from pathlib import Path

SERVING_LINE = re.compile(r"posguard serving on 127\.0\.0\.1:(\d+)")


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "posguard_server", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def start_serving(data_dir: Path, *extra: str) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "posguard_server",
            "--data-dir",
            str(data_dir),
            "--listen",
            "127.0.0.1:0",
            "--metrics-port",
            "0",
            *extra,
            "serve",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        match = SERVING_LINE.search(line)
        if match:
            return process, int(match.group(1))
    process.kill()
    raise AssertionError("the server did not report that it is serving")


def test_keys_create_list_revoke_from_the_command_line(database_url: str, tmp_path: Path) -> None:
    env = {"POSGUARD_DATABASE_URL": database_url, "POSGUARD_DATA_DIR": str(tmp_path)}
    assert run_cli("db", "upgrade", env=env).returncode == 0
    created = run_cli("keys", "create", "--role", "admin", "--name", "ops", "--json", env=env)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["token"].startswith(f"pgk_{key['key_id']}_")
    listed = run_cli("keys", "list", env=env)
    assert key["key_id"] in listed.stdout
    assert key["token"] not in listed.stdout
    revoked = run_cli("keys", "revoke", key["key_id"], "--reason", "left the team", env=env)
    assert revoked.returncode == 0, revoked.stderr
    assert key["key_id"] not in run_cli("keys", "list", env=env).stdout
    assert key["key_id"] in run_cli("keys", "list", "--all", env=env).stdout
    missing = run_cli("keys", "revoke", "000000000000", "--reason", "x", env=env)
    assert missing.returncode == 1
    assert "no key" in missing.stderr
    assert "Traceback" not in created.stderr + listed.stderr + revoked.stderr + missing.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_answers_health_and_stops_gracefully_on_signals(tmp_path: Path, signum: signal.Signals) -> None:
    created = run_cli("--data-dir", str(tmp_path), "keys", "create", "--role", "admin", "--json")
    token = json.loads(created.stdout)["token"]
    process, port = start_serving(tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with posguard.Client(f"127.0.0.1:{port}", api_key=token) as client:
            assert len(client.list_api_keys().keys) == 1
        process.send_signal(signum)
        assert process.wait(timeout=20) == 0
        assert process.stderr is not None
        rest = process.stderr.read()
        assert "shutting down" in rest
        assert "stopped" in rest
        assert token.rsplit("_", 1)[-1] not in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# SQLite is migrated on start; only a shared database waits for an operator's `db upgrade`.
@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_serve_refuses_a_shared_database_whose_schema_is_not_current(
    database_url: str, tmp_path: Path
) -> None:
    refused = run_cli("--database-url", database_url, "--data-dir", str(tmp_path), "serve", timeout=60)
    assert refused.returncode == 1
    assert "posguard-server db upgrade" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert run_cli("--database-url", database_url, "db", "upgrade").returncode == 0
    assert run_cli("--database-url", database_url, "db", "current").stdout.strip() == "current"
