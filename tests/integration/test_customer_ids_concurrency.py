"""Several server processes on one PostgreSQL issue numbers at once: no duplicate, no double customer."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import create_engine, text

import posguard

from .conftest import start_replicas

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
    token, ports = start_replicas(database_url, tmp_path, cli, serve_process, PROCESSES)

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
