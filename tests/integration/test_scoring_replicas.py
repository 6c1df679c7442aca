"""Two server processes score one customer at once, on one database: no score is lost from the profile.

Each process has its own writer; what keeps the profile right is the customer's lock (PostgreSQL), the
writer lock (SQLite) and the profile's version. Afterwards the stored profile must be exactly the one
recomputed from the stored transactions in the order they were scored, and each transaction must have seen
every one scored before it.
"""

from __future__ import annotations

import random
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import create_engine, text

import posguard
from posguard.v1 import common_pb2, risk_pb2
from posguard_models.features import Event, Profile
from posguard_server.store.db import normalize_url

from .conftest import start_replicas

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Cli, ServeProcess

PROCESSES = 2
THREADS_PER_PROCESS = 3
SCORES_PER_THREAD = 15


def test_two_servers_scoring_one_customer_leave_the_profile_of_the_stored_history(
    database_url: str, tmp_path: Path, cli: Cli, serve_process: ServeProcess
) -> None:
    token, ports = start_replicas(database_url, tmp_path, cli, serve_process, PROCESSES)
    with posguard.Client(f"127.0.0.1:{ports[0]}", api_key=token, timeout=30) as client:
        issued = client.issue_customer_id()
    number, customer_id = issued.customer.primary.number, issued.customer.customer_id

    now = datetime.now(UTC)
    errors: list[BaseException] = []
    start = threading.Barrier(PROCESSES * THREADS_PER_PROCESS)

    def score(port: int, seed: int) -> None:
        rng = random.Random(seed)
        try:
            with posguard.Client(f"127.0.0.1:{port}", api_key=token, timeout=30) as client:
                start.wait()
                for _ in range(SCORES_PER_THREAD):
                    transaction = risk_pb2.Transaction(
                        transaction_id="tx-" + uuid.uuid4().hex,
                        customer_number=number,
                        amount=common_pb2.Money(amount_minor=rng.randint(100, 90_000), currency="EUR"),
                        merchant_id="m-1",
                        terminal_id="t-1",
                        channel=common_pb2.CHANNEL_POS,
                    )
                    # Out of event-time order on purpose: the profile follows the order of scoring.
                    transaction.event_time.FromDatetime(now - timedelta(minutes=rng.uniform(1, 600)))
                    client.score_transaction(transaction=transaction)
        except BaseException as error:  # reported below; a thread must not die silently
            errors.append(error)

    threads = [
        threading.Thread(target=score, args=(port, 100 * p + t))
        for p, port in enumerate(ports)
        for t in range(THREADS_PER_PROCESS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors

    engine = create_engine(normalize_url(database_url))
    try:
        with engine.connect() as connection:
            # Ids are taken in the order the scores were stored: under the customer's lock, one at a time.
            rows = connection.execute(
                text(
                    "SELECT event_time, amount_minor, history_size, terminal_id, merchant_id, latitude, "
                    "longitude FROM risk_transactions "
                    "WHERE customer_id = :customer ORDER BY id"
                ),
                {"customer": customer_id},
            ).all()
            state, count = connection.execute(
                text("SELECT state, transaction_count FROM risk_profiles WHERE customer_id = :customer"),
                {"customer": customer_id},
            ).one()
    finally:
        engine.dispose()
    assert len(rows) == PROCESSES * THREADS_PER_PROCESS * SCORES_PER_THREAD == count
    assert [row.history_size for row in rows] == list(range(len(rows)))  # each saw all before it
    expected = Profile()
    for row in rows:
        event_time = row.event_time if isinstance(row.event_time, datetime) else _parse(row.event_time)
        expected.update(
            Event.of(
                event_time.timestamp(),
                row.amount_minor / 100,
                row.terminal_id,
                row.merchant_id,
                row.latitude,
                row.longitude,
            )
        )
    assert bytes(state) == expected.to_bytes()


def _parse(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
