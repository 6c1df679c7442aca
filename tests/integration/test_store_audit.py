"""The audit log in the database, against SQLite and PostgreSQL: appends, listing, and tampering found."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Connection, insert, select, text, update

from posguard_server.domain.api_keys import Role
from posguard_server.domain.audit import GENESIS_HASH, AuditProblem, canonical_details, make_event
from posguard_server.domain.errors import AlreadyExists, FailedPrecondition
from posguard_server.store.api_keys import SqlApiKeyStore
from posguard_server.store.audit import SqlAuditEvent, SqlAuditHead, SqlAuditStore, append_event
from posguard_server.store.db import Database

T0 = datetime(2025, 3, 1, 8, 0, 0, 250000, tzinfo=UTC)
N = 50


@pytest.fixture
def audit(database: Database) -> SqlAuditStore:
    return SqlAuditStore(database)


@pytest.fixture
def filled(audit: SqlAuditStore) -> SqlAuditStore:
    """A log of N events by three actors about ten subjects."""
    for i in range(1, N + 1):
        audit.append(
            actor=f"actor{i % 3}",
            action="customer.suspended" if i % 2 else "customer.reactivated",
            subject=f"1564 **** **** **** {i % 10:04d}",
            details={"reason": f"case {i}", "customer_id": f"c{i}"},
            now=T0 + timedelta(minutes=i),
        )
    return audit


def _sql(database: Database, *statements: str) -> None:
    with database.engine.begin() as connection:
        for statement in statements:
            connection.execute(text(statement))


def _row(database: Database, sequence: int) -> dict[str, object]:
    with database.engine.connect() as connection:
        row = connection.execute(select(SqlAuditEvent).where(SqlAuditEvent.sequence == sequence)).one()
        return dict(row._mapping)


def _insert_forged(connection: Connection, sequence: int, previous_hash: str) -> None:
    # Someone who knows the format computes a valid hash for the forged row itself.
    forged = make_event(
        sequence=sequence,
        occurred_at=T0,
        actor="intruder",
        action="api_key.created",
        subject="deadbeef0000",
        details={"role": "admin"},
        previous_hash=previous_hash,
    )
    connection.execute(
        insert(SqlAuditEvent).values(
            sequence=forged.sequence,
            occurred_at=forged.occurred_at,
            actor=forged.actor,
            action=forged.action,
            subject=forged.subject,
            details=canonical_details(forged.details),
            previous_hash=forged.previous_hash,
            hash=forged.hash,
        )
    )


def _shift_up_from(connection: Connection, first: int) -> None:
    # Two steps through negative numbers: PostgreSQL checks the primary key row by row, so a one-statement
    # "sequence + 1" would collide with the next row.
    connection.execute(text(f"UPDATE audit_events SET sequence = -(sequence + 1) WHERE sequence >= {first}"))
    connection.execute(text("UPDATE audit_events SET sequence = -sequence WHERE sequence < 0"))


def _swap(database: Database, a: int, b: int) -> None:
    _sql(
        database,
        f"UPDATE audit_events SET sequence = -1 WHERE sequence = {a}",
        f"UPDATE audit_events SET sequence = {a} WHERE sequence = {b}",
        f"UPDATE audit_events SET sequence = {b} WHERE sequence = -1",
    )


def test_appended_events_form_an_intact_gap_free_chain(filled: SqlAuditStore, database: Database) -> None:
    report = filled.verify()
    assert report.intact, report.detail
    assert (report.entries_checked, report.first_bad_sequence, report.problem) == (N, 0, AuditProblem.NONE)
    events, cursor = filled.list(limit=1000)
    assert cursor is None
    assert [e.sequence for e in events] == list(range(1, N + 1))
    assert events[0].previous_hash == GENESIS_HASH
    assert all(e.previous_hash == p.hash for p, e in itertools.pairwise(events))
    assert events[0].occurred_at == T0 + timedelta(minutes=1)  # read back aware, in UTC, to the microsecond
    assert events[4].details == {"reason": "case 5", "customer_id": "c5"}
    head = filled.head()
    assert (head.sequence, head.hash) == (N, events[-1].hash)
    # The stored details are the canonical text that was hashed.
    assert _row(database, 5)["details"] == '{"customer_id":"c5","reason":"case 5"}'


def test_a_fresh_log_is_empty_and_intact(audit: SqlAuditStore) -> None:
    assert audit.list(limit=10) == ([], None)
    assert audit.head().sequence == 0
    assert audit.head().hash == GENESIS_HASH
    report = audit.verify()
    assert report.intact
    assert report.entries_checked == 0


def test_list_pages_in_sequence_order_and_filters(filled: SqlAuditStore) -> None:
    pages: list[list[int]] = []
    after: int | None = None
    while True:
        page, after = filled.list(limit=7, after=after)
        pages.append([e.sequence for e in page])
        if after is None:
            break
    assert [s for page in pages for s in page] == list(range(1, N + 1))
    assert [len(p) for p in pages] == [7] * 7 + [1]

    by_actor, _ = filled.list(actor="actor1", limit=100)
    assert [e.sequence for e in by_actor] == [i for i in range(1, N + 1) if i % 3 == 1]
    by_action, _ = filled.list(action="customer.reactivated", limit=100)
    assert {e.sequence % 2 for e in by_action} == {0}
    by_subject, _ = filled.list(subject="1564 **** **** **** 0003", limit=100)
    assert [e.sequence for e in by_subject] == [3, 13, 23, 33, 43]
    combined, _ = filled.list(subject="1564 **** **** **** 0003", actor="actor1", limit=100)
    assert [e.sequence for e in combined] == [13, 43]
    # occurred_after is inclusive, occurred_before exclusive, in any time zone.
    window, _ = filled.list(
        occurred_after=(T0 + timedelta(minutes=10)).astimezone(UTC),
        occurred_before=T0 + timedelta(minutes=13),
        limit=100,
    )
    assert [e.sequence for e in window] == [10, 11, 12]
    filtered_pages, cursor = filled.list(action="customer.suspended", limit=5)
    assert cursor == 9
    rest, _ = filled.list(action="customer.suspended", limit=100, after=cursor)
    assert [e.sequence for e in filtered_pages + rest] == list(range(1, N + 1, 2))


def _edit_details(database: Database) -> None:
    _sql(
        database,
        """UPDATE audit_events SET details = '{"customer_id":"c17","reason":"nothing"}' """
        "WHERE sequence = 17",
    )


def _edit_actor(database: Database) -> None:
    _sql(database, "UPDATE audit_events SET actor = 'actor9' WHERE sequence = 17")


def _edit_time(database: Database) -> None:
    with database.engine.begin() as connection:
        connection.execute(
            update(SqlAuditEvent)
            .where(SqlAuditEvent.sequence == 17)
            .values(occurred_at=T0 + timedelta(minutes=17, microseconds=1))
        )


def _garble_details(database: Database) -> None:
    _sql(database, "UPDATE audit_events SET details = 'not json' WHERE sequence = 17")


def _edit_and_rehash(database: Database) -> None:
    row = _row(database, 17)
    redone = make_event(
        sequence=17,
        occurred_at=row["occurred_at"],  # type: ignore[arg-type]
        actor="actor9",
        action=str(row["action"]),
        subject=str(row["subject"]),
        details={"reason": "case 17", "customer_id": "c17"},
        previous_hash=str(row["previous_hash"]),
    )
    _sql(database, f"UPDATE audit_events SET actor = 'actor9', hash = '{redone.hash}' WHERE sequence = 17")


def _delete_one(database: Database) -> None:
    _sql(database, "DELETE FROM audit_events WHERE sequence = 17")


def _delete_first(database: Database) -> None:
    _sql(database, "DELETE FROM audit_events WHERE sequence = 1")


def _delete_last(database: Database) -> None:
    _sql(database, f"DELETE FROM audit_events WHERE sequence = {N}")


def _delete_and_close_the_gap(database: Database) -> None:
    _sql(
        database,
        "DELETE FROM audit_events WHERE sequence = 17",
        "UPDATE audit_events SET sequence = -(sequence - 1) WHERE sequence > 17",
        "UPDATE audit_events SET sequence = -sequence WHERE sequence < 0",
    )


def _insert_in_the_middle(database: Database) -> None:
    before = str(_row(database, 16)["hash"])
    with database.engine.begin() as connection:
        _shift_up_from(connection, 17)
        _insert_forged(connection, 17, before)


def _insert_with_a_foreign_link(database: Database) -> None:
    with database.engine.begin() as connection:
        _shift_up_from(connection, 17)
        _insert_forged(connection, 17, "e" * 64)


def _insert_at_the_end(database: Database) -> None:
    last = str(_row(database, N)["hash"])
    with database.engine.begin() as connection:
        _insert_forged(connection, N + 1, last)


def _swap_neighbours(database: Database) -> None:
    _swap(database, 17, 18)


def _swap_far_apart(database: Database) -> None:
    _swap(database, 17, 40)


@pytest.mark.parametrize(
    ("tamper", "problem", "sequence"),
    [
        (_edit_details, AuditProblem.EDITED, 17),
        (_edit_actor, AuditProblem.EDITED, 17),
        (_edit_time, AuditProblem.EDITED, 17),
        (_garble_details, AuditProblem.EDITED, 17),
        (_edit_and_rehash, AuditProblem.EDITED, 17),
        (_delete_one, AuditProblem.DELETED, 17),
        (_delete_first, AuditProblem.DELETED, 1),
        (_delete_last, AuditProblem.DELETED, N),
        (_delete_and_close_the_gap, AuditProblem.DELETED, 17),
        (_insert_in_the_middle, AuditProblem.INSERTED, 17),
        (_insert_with_a_foreign_link, AuditProblem.INSERTED, 17),
        (_insert_at_the_end, AuditProblem.INSERTED, N + 1),
        (_swap_neighbours, AuditProblem.REORDERED, 17),
        (_swap_far_apart, AuditProblem.REORDERED, 17),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_tampering_in_the_database_is_found(
    filled: SqlAuditStore,
    database: Database,
    tamper: Callable[[Database], None],
    problem: AuditProblem,
    sequence: int,
) -> None:
    tamper(database)
    report = filled.verify()
    assert not report.intact
    assert (report.problem, report.first_bad_sequence) == (problem, sequence), report.detail
    assert f"event {sequence}" in report.detail
    assert "case " not in report.detail  # names places, never content
    # The listing still works on a damaged log, so an auditor can look at the place named.
    events, _ = filled.list(limit=1000)
    assert events


def test_verify_from_a_sequence_links_to_the_stored_event_before_it(
    filled: SqlAuditStore, database: Database
) -> None:
    report = filled.verify(from_sequence=30)
    assert report.intact
    assert report.entries_checked == N - 29
    assert filled.verify(from_sequence=1).entries_checked == N
    assert filled.verify(from_sequence=N + 5).entries_checked == 0

    _sql(database, "UPDATE audit_events SET actor = 'actor9' WHERE sequence = 10")
    assert filled.verify(from_sequence=11).intact  # the part after the edit is sound on its own
    broken = filled.verify()
    assert (broken.problem, broken.first_bad_sequence) == (AuditProblem.EDITED, 10)

    _sql(database, "DELETE FROM audit_events WHERE sequence = 29")
    gap = filled.verify(from_sequence=30)
    assert (gap.problem, gap.first_bad_sequence) == (AuditProblem.DELETED, 29)


def test_an_append_rolled_back_with_its_caller_leaves_no_trace(
    filled: SqlAuditStore, database: Database
) -> None:
    class Boom(Exception):
        pass

    def change_then_fail() -> None:
        with database.session() as session:
            append_event(session, actor="a", action="customer.revoked", subject="s", details={}, now=T0)
            raise Boom

    with pytest.raises(Boom):
        change_then_fail()

    assert filled.head().sequence == N
    assert len(filled.list(limit=1000)[0]) == N
    assert filled.verify().intact
    after = filled.append(actor="a", action="customer.revoked", subject="s", details={}, now=T0)
    assert after.sequence == N + 1
    assert filled.verify().intact


def _create_key(
    keys: SqlApiKeyStore, key_id: str, *, request_id: str | None = None, at: datetime = T0
) -> None:
    keys.create(
        key_id=key_id,
        name="ops console",
        role=Role.ADMIN,
        secret_hash="ab" * 32,
        created_by="boss",
        request_id=request_id,
        now=at,
    )


def test_the_events_commit_with_the_change_they_record(database: Database, audit: SqlAuditStore) -> None:
    keys = SqlApiKeyStore(database)
    _create_key(keys, "k1")
    with pytest.raises(AlreadyExists):  # the key insert fails, and takes its audit event with it
        _create_key(keys, "k1")
    events, _ = audit.list(limit=100)
    assert [(e.action, e.subject) for e in events] == [("api_key.created", "k1")]
    assert audit.verify().intact


def test_creating_and_revoking_a_key_is_recorded_once(database: Database, audit: SqlAuditStore) -> None:
    keys = SqlApiKeyStore(database)
    _create_key(keys, "k1", request_id="r1")
    _create_key(keys, "k1", request_id="r1", at=T0 + timedelta(seconds=5))  # a replay changes nothing
    keys.revoke("k1", revoked_by="admin7", reason="left the team", now=T0 + timedelta(hours=1))
    keys.revoke("k1", revoked_by="admin8", reason="again", now=T0 + timedelta(hours=2))  # nor does this

    events, _ = audit.list(limit=100)
    assert [(e.sequence, e.actor, e.action, e.subject) for e in events] == [
        (1, "boss", "api_key.created", "k1"),
        (2, "admin7", "api_key.revoked", "k1"),
    ]
    assert events[0].details == {"role": "admin", "name": "ops console", "created_by": "boss"}
    assert events[0].occurred_at == T0
    assert events[1].details == {"reason": "left the team"}
    assert events[1].occurred_at == T0 + timedelta(hours=1)
    assert "ab" * 32 not in str(events)  # never the secret digest
    assert audit.verify().intact


def test_concurrent_appends_form_a_gap_free_intact_chain(database: Database, audit: SqlAuditStore) -> None:
    threads, per_thread = 8, 15
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        barrier.wait()
        try:
            for i in range(per_thread):
                audit.append(
                    actor=f"w{worker}",
                    action="customer.issued",
                    subject=f"s{i}",
                    details={"i": str(i)},
                    now=datetime.now(UTC),
                )
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(w,)) for w in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()

    assert errors == []
    events, _ = audit.list(limit=1000)
    assert [e.sequence for e in events] == list(range(1, threads * per_thread + 1))
    assert {e.actor for e in events} == {f"w{w}" for w in range(threads)}
    report = audit.verify()
    assert report.intact, report.detail
    assert report.entries_checked == threads * per_thread


def test_a_missing_head_stops_appends_and_fails_verification(
    filled: SqlAuditStore, database: Database
) -> None:
    _sql(database, "DELETE FROM audit_head")
    with pytest.raises(FailedPrecondition) as caught:
        filled.append(actor="a", action="customer.revoked", subject="s", details={}, now=T0)
    assert caught.value.reason == "AUDIT_LOG_DAMAGED"
    report = filled.verify()
    assert not report.intact
    assert report.problem is AuditProblem.DELETED


def test_the_migration_creates_the_head_at_genesis(database: Database) -> None:
    with database.engine.connect() as connection:
        rows = connection.execute(select(SqlAuditHead.id, SqlAuditHead.sequence, SqlAuditHead.hash)).all()
    assert [tuple(r) for r in rows] == [(1, 0, GENESIS_HASH)]


@pytest.mark.parametrize(
    "bad",
    [
        {"actor": ""},
        {"actor": "a" * 65},
        {"action": "x" * 65},
        {"subject": "s" * 129},
        {"details": {"Reason": "x"}},
        {"details": {"reason": 5}},
    ],
    ids=["no-actor", "long-actor", "long-action", "long-subject", "detail-key", "detail-value"],
)
def test_malformed_appends_are_refused_and_write_nothing(
    audit: SqlAuditStore, bad: dict[str, object]
) -> None:
    fields: dict[str, object] = {
        "actor": "a",
        "action": "customer.issued",
        "subject": "s",
        "details": {},
        "now": T0,
        **bad,
    }
    with pytest.raises((ValueError, TypeError)):
        audit.append(**fields)  # type: ignore[arg-type]
    assert audit.head().sequence == 0
    assert audit.list(limit=10) == ([], None)
