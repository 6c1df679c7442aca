"""VerifyCustomerId in batches: one transaction decides, counts and audits a batch, and nothing is lost.

The store tests hand ``SqlVerificationStore`` a batch directly, as the group commit would under load; the
server tests drive it through gRPC with concurrent callers.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import select

import posguard
from posguard.errors import ResourceExhaustedError
from posguard.v1 import common_pb2, customer_ids_pb2
from posguard_server.domain.check_digits import compute
from posguard_server.domain.enumeration import FailureLimit
from posguard_server.domain.verification import Verdict
from posguard_server.store.audit import SqlAuditEvent
from posguard_server.store.caller_limits import SqlCallerFailures
from posguard_server.store.customers import SqlCustomerNumber, SqlCustomerStore
from posguard_server.store.db import Database
from posguard_server.store.migrate import upgrade
from posguard_server.store.verifications import LocalReads, Presented, SqlVerificationStore, Verified

from .conftest import race_a_revocation

if TYPE_CHECKING:
    from collections.abc import Callable

    from .conftest import RunningServer

V = customer_ids_pb2


@pytest.fixture
def running(server_factory: Callable[..., RunningServer], database_url: str) -> RunningServer:
    upgrade(database_url)
    return server_factory(database_url=database_url, failure_limit=0)


def _forged(number: str, serial: int) -> str:
    body = number[:10] + f"{serial:08d}"
    return body + compute(body)


def _counters(server: RunningServer, number: str) -> tuple[int, int]:
    with server.server.database.session(read_only=True) as session:
        row = session.scalars(select(SqlCustomerNumber).where(SqlCustomerNumber.number == number)).one()
        return row.verifications, row.failed_verifications


def _audited(server: RunningServer, action: str) -> list[SqlAuditEvent]:
    with server.server.database.session(read_only=True) as session:
        return list(session.scalars(select(SqlAuditEvent).where(SqlAuditEvent.action == action)))


def test_one_batch_decides_counts_and_audits_every_kind_of_verification(running: RunningServer) -> None:
    with posguard.Client(running.target, api_key=running.key("admin")) as admin:
        customer = admin.issue_customer_id().customer
        good = customer.primary.number
        card = admin.issue_sub_id(
            request_id="s-1", primary_number=good, scope=V.SubScope(merchant_id="m-1")
        ).sub_number
        lost = admin.issue_customer_id().customer.primary.number
        admin.suspend_customer_id(number=lost, reason="lost")
    forged = _forged(good, 12345678)
    typed = "x" * 64  # longer than the failure table's column: counted under its first 40 characters
    store = SqlVerificationStore(running.server.database, FailureLimit(0, timedelta(seconds=60)))
    batch = [
        Presented(good, "k1"),
        Presented(good, "k2"),
        Presented(card.number, "k1", merchant_id="m-1"),
        Presented(card.number, "k1", merchant_id="m-2"),
        Presented(lost, "k1"),
        Presented(forged, "k1"),
        Presented(typed, "k1", problem=Verdict.MALFORMED),
        Presented(typed, "k1", problem=Verdict.MALFORMED),
    ]
    answers = store.verify_many(batch)
    assert [a.verdict for a in answers] == [
        Verdict.OK,
        Verdict.OK,
        Verdict.OK,
        Verdict.OUT_OF_SCOPE,
        Verdict.SUSPENDED,
        Verdict.NOT_FOUND,
        Verdict.MALFORMED,
        Verdict.MALFORMED,
    ]
    assert answers[0].customer_id == customer.customer_id
    assert answers[0].number is not None
    assert answers[5].number is None
    assert not any(a.refused for a in answers)
    assert _counters(running, good) == (2, 0)
    assert _counters(running, card.number) == (2, 1)
    assert _counters(running, lost) == (1, 1)
    customers = SqlCustomerStore(running.server.database)
    assert customers.failures("caller", "k1") == 5
    assert customers.failures("caller", "k2") == 0
    assert customers.failures("number", typed[:40]) == 2
    # The same malformed string again, in a batch of its own: answered, counted, never a conflict.
    assert (
        store.verify_many([Presented(typed, "k1", problem=Verdict.MALFORMED)])[0].verdict is Verdict.MALFORMED
    )
    assert customers.failures("number", typed[:40]) == 3
    reasons = [json.loads(e.details)["reason"] for e in _audited(running, "verification.failed")]
    assert reasons == ["OUT_OF_SCOPE", "SUSPENDED", "NOT_FOUND", "MALFORMED", "MALFORMED", "MALFORMED"]
    with posguard.Client(running.target, api_key=running.key("auditor")) as auditor:
        assert auditor.verify_audit_log().intact


def test_a_batch_stops_a_caller_at_its_limit_and_refuses_the_rest_unrecorded(running: RunningServer) -> None:
    with posguard.Client(running.target, api_key=running.key("admin")) as admin:
        good = admin.issue_customer_id().customer.primary.number
    store = SqlVerificationStore(running.server.database, FailureLimit(3, timedelta(seconds=60)))
    guesses = [Presented(_forged(good, serial), "attacker") for serial in range(5)]
    batch = [
        Presented(good, "attacker"),
        *guesses[:2],
        Presented(good, "bystander"),
        *guesses[2:],
        Presented(good, "attacker"),
    ]
    answers = store.verify_many(batch)
    assert [(a.verdict, a.refused) for a in answers] == [
        (Verdict.OK, False),
        (Verdict.NOT_FOUND, False),
        (Verdict.NOT_FOUND, False),
        (Verdict.OK, False),
        (Verdict.NOT_FOUND, False),  # the third guess reaches the limit: answered, and the key refused
        (Verdict.NOT_FOUND, True),
        (Verdict.NOT_FOUND, True),
        (Verdict.OK, True),  # after the refusal even a real number is refused
    ]
    assert answers[1].refused_until is None
    assert answers[4].refused_until is not None
    assert _counters(running, good) == (2, 0)  # the refused verification was not counted
    with running.server.database.session(read_only=True) as session:
        row = session.get(SqlCallerFailures, "attacker")
        assert row is not None
        assert (row.window_failures, row.times_refused) == (3, 1)
    assert len(_audited(running, "verification.failed")) == 3
    assert len(_audited(running, "caller.refused")) == 1
    # A later batch (this or another process) finds the key refused in the database: nothing is counted.
    later = store.verify_many([Presented(_forged(good, 99), "attacker"), Presented(good, "bystander")])
    assert [(a.verdict, a.refused) for a in later] == [(Verdict.NOT_FOUND, True), (Verdict.OK, False)]
    assert len(_audited(running, "verification.failed")) == 3


def test_concurrent_guessers_on_one_key_are_stopped_exactly_at_the_limit(
    server_factory: Callable[..., RunningServer], database_url: str
) -> None:
    upgrade(database_url)
    limit = 40
    server = server_factory(database_url=database_url, failure_limit=limit, failure_window_seconds=60)
    key = server.key("gateway")
    with posguard.Client(server.target, api_key=key) as client:
        good = client.issue_customer_id().customer.primary.number
    answered, refused = [], []
    lock = threading.Lock()

    def guess(worker: int) -> None:
        with posguard.Client(server.target, api_key=key) as client:
            for serial in range(10):
                try:
                    answer = client.verify_customer_id(number=_forged(good, worker * 100 + serial))
                except ResourceExhaustedError:
                    with lock:
                        refused.append(serial)
                else:
                    with lock:
                        answered.append(answer.valid)

    threads = [threading.Thread(target=guess, args=(w,)) for w in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Every guess was answered or refused, and no more were answered (and counted) than the limit.
    assert len(answered) + len(refused) == 160
    assert len(answered) == limit
    assert not any(answered)
    with server.server.database.session(read_only=True) as session:
        row = session.get(SqlCallerFailures, key.split("_")[1])
        assert row is not None
        assert row.window_failures == limit
    assert len(_audited(server, "verification.failed")) == limit


def test_a_number_revoked_is_never_answered_valid_after_the_revocation(running: RunningServer) -> None:
    """Verifiers race an operator's revocation: a verification sent after it was answered is not valid."""
    with posguard.Client(running.target, api_key=running.key("admin")) as admin:
        number = admin.issue_customer_id().customer.primary.number

    def verify(client: posguard.Client) -> tuple[bool, int]:
        answer = client.verify_customer_id(number=number)
        return answer.valid, answer.status

    race = race_a_revocation(running, number, verify)
    assert race.before
    assert race.after
    assert any(valid for valid, _ in race.before)
    assert all(not valid and status == common_pb2.NUMBER_STATUS_REVOKED for valid, status in race.after)
    running.stop()  # the counters of the last successes answered are written at the latest on the way out
    verifications, failed = _counters(running, number)
    assert verifications == len(race.before) + len(race.after)
    assert failed == len([valid for valid, _ in race.before + race.after if not valid])


def test_counters_of_successes_answered_are_written_soon_after_and_all_at_shutdown(
    running: RunningServer,
) -> None:
    """On SQLite a success is answered from its read and counted after the answer; none is lost on a stop."""
    with posguard.Client(running.target, api_key=running.key("admin")) as admin:
        number = admin.issue_customer_id().customer.primary.number
    gateway = running.key("gateway")

    def verify(times: int) -> None:
        with posguard.Client(running.target, api_key=gateway) as client:
            for _ in range(times):
                assert client.verify_customer_id(number=number).valid

    threads = [threading.Thread(target=verify, args=(25,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    deadline = time.monotonic() + 10
    while _counters(running, number) != (100, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _counters(running, number) == (100, 0)
    verify(10)
    running.stop()  # right after the answers: what is still held is written before the server lets go
    assert _counters(running, number) == (110, 0)


def test_counters_of_a_batch_move_by_the_number_of_successes_and_keep_the_latest_time(
    running: RunningServer,
) -> None:
    """``count_verified`` (one statement on SQLite, padded to four rows here): a number twice in a batch moves
    by two, to its latest time, and a number the batch does not name is left as it was."""
    with posguard.Client(running.target, api_key=running.key("admin")) as admin:
        twice, once, also_once, untouched = (
            admin.issue_customer_id().customer.primary.number for _ in range(4)
        )
    store = SqlVerificationStore(running.server.database, FailureLimit(0, timedelta(minutes=1)))
    earlier = datetime(2026, 3, 1, 9, 30, 15, 250_000, tzinfo=UTC)
    later = earlier + timedelta(seconds=2, microseconds=1)
    store.count_verified(
        [
            Verified(twice, later),
            Verified(once, earlier),
            Verified(twice, earlier),
            Verified(also_once, later),
        ]
    )
    with running.server.database.session(read_only=True) as session:
        rows = {
            row.number: row
            for row in session.scalars(
                select(SqlCustomerNumber).where(
                    SqlCustomerNumber.number.in_([twice, once, also_once, untouched])
                )
            )
        }
    assert (rows[twice].verifications, rows[twice].last_verified_at) == (2, later)
    assert (rows[once].verifications, rows[once].last_verified_at) == (1, earlier)
    assert (rows[also_once].verifications, rows[also_once].last_verified_at) == (1, later)
    assert (rows[untouched].verifications, rows[untouched].last_verified_at) == (0, None)
    assert {row.failed_verifications for row in rows.values()} == {0}


def test_the_event_loop_read_decides_as_the_write_transaction_does(server: RunningServer) -> None:
    """SQLite's fast path (LocalReads, the driver's own SQL) gives the verdicts verify_many gives."""
    with posguard.Client(server.target, api_key=server.key("admin")) as admin:
        good = admin.issue_customer_id().customer.primary.number
        shop = admin.issue_sub_id(
            request_id="s-1", primary_number=good, scope=V.SubScope(merchant_id="m-1")
        ).sub_number.number
        web = admin.issue_sub_id(
            request_id="s-2", primary_number=good, scope=V.SubScope(channel=common_pb2.CHANNEL_ONLINE)
        ).sub_number.number
        held = admin.issue_customer_id().customer.primary.number
        held_card = admin.issue_sub_id(request_id="s-3", primary_number=held).sub_number.number
        admin.suspend_customer_id(number=held, reason="lost")
        closed = admin.issue_customer_id().customer.primary.number
        admin.revoke_customer_id(number=closed, reason="closed")
        old = admin.issue_customer_id().customer.primary.number
        admin.rotate_customer_id(number=old, reason="number leaked")
    batch = [
        Presented(good, "k1"),
        Presented(shop, "k1", merchant_id="m-1"),
        Presented(shop, "k1", merchant_id="m-2"),
        Presented(web, "k1", channel="online"),
        Presented(web, "k1", channel="pos"),
        Presented(held_card, "k1"),
        Presented(held, "k1"),
        Presented(closed, "k1"),
        Presented(old, "k1"),
        Presented(_forged(good, 12345678), "k1"),
        Presented("x" * 64, "k1", problem=Verdict.MALFORMED),
    ]
    database = server.server.database
    reads = LocalReads(database)
    try:
        read = reads.verdicts(batch)
    finally:
        reads.close()
    written = SqlVerificationStore(database, FailureLimit(0, timedelta(seconds=60))).verify_many(batch)
    assert read == written
    assert [answer.verdict for answer in written] == [
        Verdict.OK,
        Verdict.OK,
        Verdict.OUT_OF_SCOPE,
        Verdict.OK,
        Verdict.OUT_OF_SCOPE,
        Verdict.SUSPENDED,
        Verdict.SUSPENDED,
        Verdict.REVOKED,
        Verdict.ROTATED,
        Verdict.NOT_FOUND,
        Verdict.MALFORMED,
    ]


def test_an_event_loop_read_takes_a_transaction_only_for_a_sub_number(server: RunningServer) -> None:
    """One statement is one snapshot: a primary number is read alone, without BEGIN and COMMIT around it;
    an active sub number is read again with its primary, both in one read transaction."""
    with posguard.Client(server.target, api_key=server.key("admin")) as admin:
        primary = admin.issue_customer_id().customer.primary.number
        sub = admin.issue_sub_id(request_id="s-1", primary_number=primary).sub_number.number
    reads = LocalReads(server.server.database)
    statements: list[str] = []
    reads._connection.set_trace_callback(statements.append)
    try:
        assert [a.verdict for a in reads.verdicts([Presented(primary, "k1")])] == [Verdict.OK]
        assert [s.split()[0] for s in statements] == ["SELECT"]
        statements.clear()
        assert [a.verdict for a in reads.verdicts([Presented(sub, "k1")])] == [Verdict.OK]
        assert [s.split()[0] for s in statements] == ["SELECT", "BEGIN", "SELECT", "SELECT", "COMMIT"]
    finally:
        reads.close()


def test_an_event_loop_read_that_fails_gives_way_to_the_write_path(tmp_path: Path) -> None:
    """A read the driver refuses (a database without the table) answers None, for verify_many to decide."""
    database = Database(f"sqlite:///{tmp_path / 'empty.db'}")
    reads = LocalReads(database)
    reader = database.sqlite_reader()
    try:
        assert reads.verdicts([Presented("1564201102123456", "k1"), Presented("x", "k1")]) == [None, None]
        with pytest.raises(sqlite3.OperationalError):  # the driver's reader only reads
            reader.execute("CREATE TABLE t (x)")
    finally:
        reader.close()
        reads.close()
        database.dispose()
