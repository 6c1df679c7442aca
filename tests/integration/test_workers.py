"""``posguard-server serve --workers N``: several processes serve one port, stop together, fail together."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import posguard

if TYPE_CHECKING:
    import subprocess

    from .conftest import Cli, ServeProcess


def _workers_of(parent: int) -> list[int]:
    """The worker processes of a ``serve --workers`` parent (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [
        int(pid)
        for pid in children
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        and b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _gone(pids: list[int], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(_alive(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


def _start(tmp_path: Path, cli: Cli, serve_process: ServeProcess) -> tuple[subprocess.Popen[str], int, str]:
    created = cli("--data-dir", str(tmp_path), "keys", "create", "--role", "gateway", "--json")
    token = json.loads(created.stdout)["token"]
    # The global flag (as POSGUARD_WORKERS); `posguard-server serve --workers 2` is the same setting.
    process, port = serve_process(tmp_path, "--workers", "2")
    return process, port, token


def test_two_workers_share_the_port_and_stop_together_on_sigterm(
    tmp_path: Path, cli: Cli, serve_process: ServeProcess
) -> None:
    process, port, token = _start(tmp_path, cli, serve_process)
    workers = _workers_of(process.pid)
    assert len(workers) == 2
    numbers = []
    for _ in range(40):  # a new connection each time: the kernel spreads connections over the workers
        with posguard.Client(f"127.0.0.1:{port}", api_key=token) as client:
            numbers.append(client.issue_customer_id().customer.primary.number)
    assert len(set(numbers)) == 40  # one counter in the database, whichever worker issued

    process.send_signal(signal.SIGTERM)
    assert process.stderr is not None
    lines = process.stderr.read().splitlines()
    assert process.wait(timeout=30) == 0
    assert _gone(workers, within=5)
    served_by = {
        entry["pid"]
        for entry in map(json.loads, lines)
        if entry.get("method") == "/posguard.v1.CustomerIds/IssueCustomerId"
    }
    assert served_by == set(workers), "both workers served calls"


def test_a_worker_that_dies_stops_the_service_with_an_error(
    tmp_path: Path, cli: Cli, serve_process: ServeProcess
) -> None:
    process, _, _ = _start(tmp_path, cli, serve_process)
    first, second = _workers_of(process.pid)
    os.kill(first, signal.SIGKILL)
    assert process.wait(timeout=30) == 1  # the supervisor (systemd, Kubernetes) restarts the service
    assert _gone([second], within=5)
    assert process.stderr is not None
    assert "exited with status -9" in process.stderr.read()
