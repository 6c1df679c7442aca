"""``posguard-server`` as an operator runs it: a real process, real signals, real databases."""

from __future__ import annotations

import json
import signal
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import posguard

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Cli, ServeProcess


def test_keys_create_list_revoke_from_the_command_line(database_url: str, tmp_path: Path, cli: Cli) -> None:
    env = {"POSGUARD_DATABASE_URL": database_url, "POSGUARD_DATA_DIR": str(tmp_path)}
    assert cli("db", "upgrade", env=env).returncode == 0
    created = cli("keys", "create", "--role", "admin", "--name", "ops", "--json", env=env)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["token"].startswith(f"pgk_{key['key_id']}_")
    listed = cli("keys", "list", env=env)
    assert key["key_id"] in listed.stdout
    assert key["token"] not in listed.stdout
    revoked = cli("keys", "revoke", key["key_id"], "--reason", "left the team", env=env)
    assert revoked.returncode == 0, revoked.stderr
    assert key["key_id"] not in cli("keys", "list", env=env).stdout
    assert key["key_id"] in cli("keys", "list", "--all", env=env).stdout
    missing = cli("keys", "revoke", "000000000000", "--reason", "x", env=env)
    assert missing.returncode == 1
    assert "no key" in missing.stderr
    assert "Traceback" not in created.stderr + listed.stderr + revoked.stderr + missing.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_answers_health_and_stops_gracefully_on_signals(
    tmp_path: Path, signum: signal.Signals, serve_process: ServeProcess, cli: Cli
) -> None:
    created = cli("--data-dir", str(tmp_path), "keys", "create", "--role", "admin", "--json")
    token = json.loads(created.stdout)["token"]
    process, port = serve_process(tmp_path)
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
    database_url: str, tmp_path: Path, cli: Cli
) -> None:
    refused = cli("--database-url", database_url, "--data-dir", str(tmp_path), "serve", timeout=60)
    assert refused.returncode == 1
    assert "posguard-server db upgrade" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert cli("--database-url", database_url, "db", "upgrade").returncode == 0
    assert cli("--database-url", database_url, "db", "current").stdout.strip() == "current"
