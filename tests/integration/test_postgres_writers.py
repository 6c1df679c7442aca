"""``postgres_writers``: how many batches of gateway calls a server writes to PostgreSQL at once.

A batch waiting for a customer's row lock (held here by another connection, as another server's batch or an
operator's transaction would hold it) occupies its writer. With two writers, a call of another customer is
answered meanwhile; the one-writer default would hold it back until the lock is released.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import grpc
import pytest
from sqlalchemy import Connection, Engine, TextClause, create_engine, text

import posguard
from posguard.v1 import common_pb2, risk_pb2, risk_pb2_grpc
from posguard_server.store import db
from posguard_server.store.migrate import upgrade

if TYPE_CHECKING:
    from .conftest import RunningServer


def _txn(number: str) -> risk_pb2.Transaction:
    when = risk_pb2.Transaction().event_time
    when.FromDatetime(datetime.now(UTC))
    return risk_pb2.Transaction(
        transaction_id="tx-" + uuid.uuid4().hex,
        amount=common_pb2.Money(amount_minor=9_90, currency="CNY"),
        merchant_id="m-1",
        terminal_id="t-1",
        channel=common_pb2.CHANNEL_POS,
        event_time=when,
        customer_number=number,
    )


_LOCK_WAITS = text(
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
)
_LOCK_CUSTOMER = text("SELECT 1 FROM customers WHERE customer_id = :id FOR UPDATE")


def _lock_waits(connection: Connection) -> int:
    """How many statements of this database wait for a lock."""
    return int(connection.scalar(_LOCK_WAITS))


@contextmanager
def _holding(engine: Engine, lock: TextClause, values: dict[str, str] | None = None) -> Iterator[Connection]:
    """A transaction of another connection that holds the lock ``lock`` takes, until the block ends."""
    with engine.connect() as connection, connection.begin():
        connection.execute(lock, values or {})
        yield connection


def _wait_for_a_lock_wait(engine: Engine) -> None:
    """Until a statement of this database waits for a row lock."""
    give_up = time.monotonic() + 30
    while time.monotonic() < give_up:
        with engine.connect() as connection:
            if _lock_waits(connection):
                return
        time.sleep(0.02)
    raise AssertionError("no statement came to wait for the lock")


def test_a_second_writer_answers_other_customers_while_one_batch_waits_for_a_lock(
    server_factory: Callable[..., RunningServer], database_url: str
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer whatever the setting")
    upgrade(database_url)
    running = server_factory(database_url=database_url, postgres_writers=2)
    engine = create_engine(database_url)
    with posguard.Client(running.target, api_key=running.key("gateway")) as gateway:
        held = gateway.issue_customer_id().customer
        other = gateway.issue_customer_id().customer
        answers: list[risk_pb2.ScoreTransactionResponse] = []
        try:
            with _holding(engine, _LOCK_CUSTOMER, {"id": held.customer_id}):
                waiting = threading.Thread(
                    target=lambda: answers.append(
                        gateway.score_transaction(transaction=_txn(held.primary.number), timeout=30)
                    )
                )
                waiting.start()
                _wait_for_a_lock_wait(engine)
                # Answered by the second writer while the first waits for the lock held here.
                gateway.score_transaction(transaction=_txn(other.primary.number), timeout=10)
                assert waiting.is_alive()
                assert answers == []
            waiting.join(timeout=30)  # the lock is released with the transaction
            assert not waiting.is_alive()
            assert [a.customer_id for a in answers] == [held.customer_id]
        finally:
            engine.dispose()


def test_a_batch_stops_waiting_for_a_lock_when_its_callers_have_given_up(
    server_factory: Callable[..., RunningServer], database_url: str
) -> None:
    """With the one-writer default, a lock held elsewhere holds the writer only until the deadline of the
    calls waiting for it: after that the batch rolls back and the writer serves other customers."""
    if not database_url.startswith("postgresql"):
        pytest.skip("a SQLite writer waits for its busy timeout, not for row locks")
    upgrade(database_url)
    running = server_factory(database_url=database_url)
    engine = create_engine(database_url)
    with posguard.Client(running.target, api_key=running.key("gateway")) as gateway:
        held = gateway.issue_customer_id().customer
        other = gateway.issue_customer_id().customer
        try:
            with _holding(engine, _LOCK_CUSTOMER, {"id": held.customer_id}) as connection:
                started = time.monotonic()
                with pytest.raises(posguard.errors.DeadlineExceededError):
                    gateway.score_transaction(transaction=_txn(held.primary.number), timeout=1.0)
                assert time.monotonic() - started < 5
                # The lock is still held; the writer no longer waits for it.
                answer = gateway.score_transaction(transaction=_txn(other.primary.number), timeout=10)
                assert answer.customer_id == other.customer_id
                assert _lock_waits(connection) == 0
        finally:
            engine.dispose()
        # Once the lock is free, the customer is scored again.
        assert gateway.score_transaction(transaction=_txn(held.primary.number), timeout=10).customer_id == (
            held.customer_id
        )


def test_a_call_without_a_deadline_waits_for_a_lock_only_so_long(
    server_factory: Callable[..., RunningServer], database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway that sets no deadline (the Python client always sets one) still cannot hold the writer."""
    if not database_url.startswith("postgresql"):
        pytest.skip("a SQLite writer waits for its busy timeout, not for row locks")
    monkeypatch.setattr(db, "_GATEWAY_LOCK_WAIT_S", 1.0)
    upgrade(database_url)
    running = server_factory(database_url=database_url)
    engine = create_engine(database_url)
    with (
        posguard.Client(running.target, api_key=running.key("gateway")) as gateway,
        grpc.insecure_channel(running.target) as channel,
    ):
        held = gateway.issue_customer_id().customer
        other = gateway.issue_customer_id().customer
        score = risk_pb2_grpc.RiskStub(channel).ScoreTransaction
        metadata = (("authorization", f"Bearer {running.key('gateway')}"),)
        try:
            with _holding(engine, _LOCK_CUSTOMER, {"id": held.customer_id}):
                started = time.monotonic()
                request = risk_pb2.ScoreTransactionRequest(transaction=_txn(held.primary.number))
                call = score.future(request, metadata=metadata)  # no timeout: no deadline
                try:
                    # Waited for here (not by the call) for at most 10 s: without the bound it never ends.
                    refused = call.exception(timeout=10)
                finally:
                    call.cancel()
                assert isinstance(refused, grpc.Call)
                assert refused.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert time.monotonic() - started < 5
                answer = gateway.score_transaction(transaction=_txn(other.primary.number), timeout=10)
                assert answer.customer_id == other.customer_id
        finally:
            engine.dispose()


def test_an_operators_change_stops_waiting_for_a_lock_at_its_deadline(
    server_factory: Callable[..., RunningServer], database_url: str
) -> None:
    """The same bound in the units of the other RPCs (ORM sessions): here the audit log's head, which every
    audited change locks, held by another connection."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite waits for its busy timeout, not for row locks")
    upgrade(database_url)
    running = server_factory(database_url=database_url)
    engine = create_engine(database_url)
    with (
        posguard.Client(running.target, api_key=running.key("gateway")) as gateway,
        posguard.Client(running.target, api_key=running.key("admin")) as admin,
    ):
        number = gateway.issue_customer_id().customer.primary.number
        try:
            with _holding(engine, text("SELECT 1 FROM audit_head FOR UPDATE")) as connection:
                with pytest.raises(posguard.errors.DeadlineExceededError):
                    admin.suspend_customer_id(number=number, reason="card lost", timeout=1.0)
                # The server's statement gave up too, though the lock is still held.
                give_up = time.monotonic() + 5
                while _lock_waits(connection) and time.monotonic() < give_up:
                    time.sleep(0.05)
                assert _lock_waits(connection) == 0
        finally:
            engine.dispose()
        # Nothing was changed; with the lock free, the same change goes through.
        assert gateway.verify_customer_id(number=number).valid
        admin.suspend_customer_id(number=number, reason="card lost", timeout=10)
        assert not gateway.verify_customer_id(number=number).valid
