"""Several server processes on one PostgreSQL issue numbers at once: no duplicate, no double customer."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import create_engine, text

import posguard
from posguard_server.domain.keyring import load_or_create

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Cli, ServeProcess

PROCESSES = 4
THREADS_PER_PROCESS = 2
ISSUES_PER_THREAD = 40


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_concurrent_processes_issue_unique_numbers_and_one_customer_per_request_id(
    database_url: str, tmp_path: Path, cli: Cli, serve_process: ServeProcess
) -> None:
    # Replicas share one key ring, handed to each as an operator would (from a secret store).
    load_or_create(tmp_path / "keys.json")
    env = {
        "POSGUARD_DATABASE_URL": database_url,
        "POSGUARD_NUMBER_KEYS": (tmp_path / "keys.json").read_text(),
    }
    assert cli("db", "upgrade", env=env).returncode == 0
    created = cli("--data-dir", str(tmp_path), "keys", "create", "--role", "gateway", env=env)
    token = created.stdout.strip()
    ports = [serve_process(tmp_path / f"replica{i}", env=env)[1] for i in range(PROCESSES)]

    numbers: list[str] = []
    shared: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(PROCESSES * THREADS_PER_PROCESS)

    def issue(port: int) -> None:
        try:
            with posguard.Client(f"127.0.0.1:{port}", api_key=token, timeout=30) as client:
                start.wait()
                # The same retried request reaches every replica at once.
                answer = client.issue_customer_id(request_id="retried-everywhere")
                mine = [client.issue_customer_id().customer.primary.number for _ in range(ISSUES_PER_THREAD)]
            with lock:
                numbers.extend(mine)
                shared.append(answer.customer.primary.number)
        except BaseException as error:  # reported below; a thread must not die silently
            errors.append(error)

    threads = [
        threading.Thread(target=issue, args=(port,)) for port in ports for _ in range(THREADS_PER_PROCESS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert len(numbers) == PROCESSES * THREADS_PER_PROCESS * ISSUES_PER_THREAD
    assert len(set(numbers)) == len(numbers)
    assert len(set(shared)) == 1
    assert shared[0] not in numbers

    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            customers = connection.execute(text("SELECT count(*) FROM customers")).scalar_one()
            distinct = connection.execute(
                text("SELECT count(DISTINCT number) FROM customer_numbers")
            ).scalar_one()
            retried = connection.execute(
                text("SELECT count(*) FROM customers WHERE request_id = 'retried-everywhere'")
            ).scalar_one()
    finally:
        engine.dispose()
    assert customers == len(numbers) + 1
    assert distinct == customers
    assert retried == 1
