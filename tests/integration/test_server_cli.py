"""``posguard-server`` as an operator runs it: a real process, real signals, real databases."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import posguard

from .conftest import SERVING_LINE

if TYPE_CHECKING:
    from collections.abc import Iterator
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
        assert token.split("_", 2)[2] not in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# SQLite is migrated on start; only a shared database waits for an operator's `db upgrade`.
@pytest.mark.postgres
@pytest.mark.empty_database
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


# -- one output per command: answers, not the service log -----------------------------------------------


def test_commands_other_than_serve_print_no_log_lines(tmp_path: Path, cli: Cli) -> None:
    data = ("--data-dir", str(tmp_path))
    upgraded = cli(*data, "db", "upgrade")
    assert (upgraded.returncode, upgraded.stdout, upgraded.stderr) == (0, "database schema at head\n", "")
    created = cli(*data, "keys", "create", "--role", "admin", "--name", "ops")
    assert created.returncode == 0, created.stderr
    # The one line meant for the person at the terminal; no INFO lines of the store or the numbering.
    assert created.stderr.splitlines() == [created.stderr.strip()]
    assert created.stderr.startswith("created admin key ")
    assert len(created.stdout.splitlines()) == 1  # the token
    for args in (("keys", "list"), ("audit", "verify"), ("db", "current"), ("models", "list")):
        done = cli(*data, *args)
        assert done.returncode == 0, done.stderr
        assert not [line for line in done.stdout.splitlines() + done.stderr.splitlines() if "{" in line[:1]]
        assert " INFO " not in done.stderr
    # Asked for, the detail still comes: as text, unless a format is named.
    debug = cli(*data, "--log-level", "DEBUG", "keys", "list")
    assert " INFO alembic" in debug.stderr
    assert not debug.stderr.startswith("{")
    named = cli(*data, "--log-level", "DEBUG", "--log-format", "json", "keys", "list")
    assert named.stderr.startswith("{")


# -- settings flags after the subcommand -----------------------------------------------------------------


def test_settings_flags_follow_the_subcommand_and_win(tmp_path: Path, cli: Cli) -> None:
    created = cli("keys", "create", "--role", "admin", "--json", "--data-dir", str(tmp_path))
    assert created.returncode == 0, created.stderr
    key_id = json.loads(created.stdout)["key_id"]
    assert key_id in cli("--data-dir", str(tmp_path), "keys", "list").stdout
    bad = cli("keys", "list", "--listen", "nowhere")
    assert bad.returncode == 2
    assert "listen" in bad.stderr

    # The group's --listen names a port nobody may bind; the one after `serve` wins.
    command = [
        sys.executable, "-m", "posguard_server", "--listen", "127.0.0.1:1", "--log-format", "json",
        "serve", "--listen", "127.0.0.1:0", "--metrics-port", "0", "--data-dir", str(tmp_path),
        "--log-format", "text",
    ]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line and process.poll() is not None:
                break
            match = SERVING_LINE.search(line)
            if match:
                assert not line.startswith("{")  # --log-format text after serve won too
                port = int(match.group(1))
        assert port is not None, "the server did not report that it is serving"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stderr is not None:
            process.stderr.close()


def test_serve_help_lists_the_settings_and_required_options_are_marked(cli: Cli) -> None:
    assert "--listen" in cli("serve", "--help").stdout
    assert "--database-url" in cli("serve", "--help").stdout
    assert "--listen" not in cli("keys", "create", "--help").stdout  # accepted, not repeated
    for args, required in (
        (("models", "promote"), 2),  # --version, --reason
        (("models", "rollback"), 1),
        (("keys", "create"), 1),
        (("keys", "revoke"), 1),
        (("report",), 0),  # --out defaults to REPORTS_DIR/VERSION
    ):
        help_text = cli(*args, "--help").stdout
        assert help_text.count("[required]") == required, help_text


# -- a port in use: one line, exit status 2 --------------------------------------------------------------


@contextmanager
def _held_port(port: int = 0) -> Iterator[socket.socket]:
    """A port some other program listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        yield holder


def _port_pair() -> tuple[int, socket.socket]:
    """A free port P and a socket listening on P + 1, for worker 1's metrics port."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        holder = socket.socket()
        try:
            holder.bind(("127.0.0.1", port + 1))
        except OSError:
            holder.close()
            continue
        holder.listen()
        return port, holder


@pytest.mark.parametrize("where", ["listen", "metrics", "metrics of worker 1"])
def test_a_port_in_use_is_one_line_and_exit_status_2(tmp_path: Path, cli: Cli, where: str) -> None:
    data = ("--data-dir", str(tmp_path))
    if where == "metrics of worker 1":
        first, holder = _port_pair()
        with holder:
            taken = first + 1
            done = cli(
                *data, "serve", "--listen", "127.0.0.1:0", "--metrics-port", str(first), "--workers", "2"
            )
        expected = (
            f"cannot listen on 127.0.0.1:{taken} (setting metrics_port / POSGUARD_METRICS_PORT, "
            "plus 1 for worker 1): address already in use"
        )
    else:
        with _held_port() as holder:
            taken = int(holder.getsockname()[1])
            if where == "listen":
                done = cli(*data, "serve", "--listen", f"127.0.0.1:{taken}", "--metrics-port", "0")
                setting = "listen / POSGUARD_LISTEN"
            else:
                done = cli(*data, "serve", "--listen", "127.0.0.1:0", "--metrics-port", str(taken))
                setting = "metrics_port / POSGUARD_METRICS_PORT"
        expected = f"cannot listen on 127.0.0.1:{taken} (setting {setting}): address already in use"
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"Error: {expected}"]
    assert done.stdout == ""


# -- exit statuses ---------------------------------------------------------------------------------------


def test_exit_statuses_follow_the_shared_table(tmp_path: Path, cli: Cli) -> None:
    data = ("--data-dir", str(tmp_path))
    assert cli(*data, "db", "upgrade").returncode == 0
    assert cli(*data, "db", "current").returncode == 0  # yes, current
    assert cli(*data, "keys", "create", "--role", "nobody").returncode == 2  # a bad value
    assert cli(*data, "keys", "revoke", "000000000000", "--reason", "x").returncode == 1  # refused
    assert cli(*data, "--issuers-file", str(tmp_path / "missing.json"), "audit", "report").returncode == 2
    assert cli(*data, "audit", "verify").returncode == 0
    with sqlite3.connect(tmp_path / "posguard.db") as connection:  # a forger edits the log
        cli(*data, "keys", "create", "--role", "admin")
        connection.execute("UPDATE audit_events SET subject = 'x' WHERE sequence = 1")
    broken = cli(*data, "audit", "verify")
    assert broken.returncode == 3  # it ran; the answer is no
    assert "BROKEN at event 1" in broken.stdout


# -- start-up --------------------------------------------------------------------------------------------


def test_the_command_line_starts_without_the_heavy_libraries() -> None:
    """Help and quick commands must not pay for scikit-learn, gRPC or the database layer at start-up."""
    probe = textwrap.dedent(
        """
        import sys
        from posguard_server.cli import main
        for args in (["--help"], ["models", "--help"], ["retrain", "--help"], ["serve", "--help"]):
            try:
                main(args, prog_name="posguard-server")
            except SystemExit:
                pass
        heavy = {"sklearn", "numpy", "matplotlib", "grpc", "sqlalchemy", "alembic"}
        loaded = [m for m in sys.modules if m.split(".")[0] in heavy or m == "posguard_models.training"]
        print(sorted(loaded), file=sys.stderr)
        """
    )
    command = [sys.executable, "-c", probe]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "[]"
