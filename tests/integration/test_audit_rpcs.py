"""ListAuditEvents and VerifyAuditLog on a real server, and ``posguard-server audit`` on a real database."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from click.testing import CliRunner
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import text

import posguard
from posguard.v1 import admin_pb2
from posguard_server.cli import main
from posguard_server.domain.api_keys import Role, create_key
from posguard_server.store.api_keys import SqlApiKeyStore
from posguard_server.store.db import Database
from posguard_server.store.migrate import upgrade

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import RunningServer


def _stamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _all_events(client: posguard.Client, **filters: Any) -> list[admin_pb2.AuditEvent]:
    events: list[admin_pb2.AuditEvent] = []
    token = ""
    while True:
        page = client.list_audit_events(page_token=token, **filters)
        events.extend(page.events)
        token = page.next_page_token
        if not token:
            return events


def _tamper(server: RunningServer, statement: str) -> None:
    with server.server.database.engine.begin() as connection:
        connection.execute(text(statement))


@pytest.fixture
def busy(server: RunningServer) -> RunningServer:
    """A server whose log holds key creations and revocations made through the API."""
    with posguard.Client(server.target, api_key=server.key("admin")) as admin:
        made = [admin.create_api_key(name=f"till {i}", role=admin_pb2.ROLE_GATEWAY) for i in range(5)]
        admin.revoke_api_key(key_id=made[1].key.key_id, reason="device stolen")
        admin.revoke_api_key(key_id=made[3].key.key_id, reason="replaced")
    return server


def test_key_operations_through_the_api_are_listed_in_order(busy: RunningServer) -> None:
    with posguard.Client(busy.target, api_key=busy.key("auditor")) as auditor:
        events = _all_events(auditor)
    # The fixture's admin key (made by "test"), five keys, two revocations, then the auditor key.
    assert [e.sequence for e in events] == list(range(1, 10))
    assert [e.action for e in events] == ["api_key.created"] * 6 + ["api_key.revoked"] * 2 + [
        "api_key.created"
    ]
    admin_key_id = events[0].subject
    assert events[0].actor == "test"
    assert {e.actor for e in events[1:8]} == {admin_key_id}  # the caller, taken from its API key
    assert events[1].details["role"] == "gateway"
    assert events[1].details["name"] == "till 0"
    assert events[1].details["created_by"] == admin_key_id
    assert events[6].details == {"reason": "device stolen"}
    assert events[0].previous_hash == "0" * 64
    assert all(e.previous_hash == p.hash for p, e in itertools.pairwise(events))
    assert all(e.occurred_at.seconds > 0 for e in events)


def test_list_pages_and_filters(busy: RunningServer) -> None:
    with posguard.Client(busy.target, api_key=busy.key("auditor")) as auditor:
        everything = _all_events(auditor)
        first = auditor.list_audit_events(page_size=4)
        assert [e.sequence for e in first.events] == [1, 2, 3, 4]
        assert first.next_page_token
        paged = _all_events(auditor, page_size=4)
        assert [e.sequence for e in paged] == [e.sequence for e in everything]

        revoked = _all_events(auditor, action="api_key.revoked", page_size=1)
        assert [e.sequence for e in revoked] == [7, 8]
        admin_key_id = everything[0].subject
        by_actor = _all_events(auditor, actor=admin_key_id)
        assert [e.sequence for e in by_actor] == list(range(2, 9))
        about = _all_events(auditor, subject=everything[2].subject)
        assert [e.action for e in about] == ["api_key.created", "api_key.revoked"]
        assert _all_events(auditor, actor="nobody") == []

        lower, upper = everything[2].occurred_at, everything[5].occurred_at
        windowed = _all_events(auditor, occurred_after=lower, occurred_before=upper)
        expected = [
            e.sequence
            for e in everything
            if lower.ToDatetime() <= e.occurred_at.ToDatetime() < upper.ToDatetime()
        ]
        assert [e.sequence for e in windowed] == expected
        assert 3 in expected


def test_admins_may_read_the_log_and_gateways_may_not(busy: RunningServer) -> None:
    with posguard.Client(busy.target, api_key=busy.key("admin")) as admin:
        assert admin.verify_audit_log().intact
        assert admin.list_audit_events().events
    with posguard.Client(busy.target, api_key=busy.key("gateway")) as gateway:
        with pytest.raises(posguard.PermissionDeniedError) as caught:
            gateway.list_audit_events()
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(posguard.PermissionDeniedError):
            gateway.verify_audit_log()


def test_verify_is_intact_after_key_operations(busy: RunningServer) -> None:
    with posguard.Client(busy.target, api_key=busy.key("auditor")) as auditor:
        report = auditor.verify_audit_log()
        assert report.intact
        assert report.entries_checked == 9
        assert report.first_bad_sequence == 0
        assert report.problem == admin_pb2.AUDIT_PROBLEM_NONE
        assert "intact" in report.detail
        tail = auditor.verify_audit_log(from_sequence=5)
        assert (tail.intact, tail.entries_checked) == (True, 5)


@pytest.mark.parametrize(
    ("statement", "problem", "sequence"),
    [
        ('UPDATE audit_events SET details = \'{"reason":"routine"}\' WHERE sequence = 7', "EDITED", 7),
        ("UPDATE audit_events SET actor = 'cli' WHERE sequence = 4", "EDITED", 4),
        ("DELETE FROM audit_events WHERE sequence = 5", "DELETED", 5),
        ("DELETE FROM audit_events WHERE sequence = 9", "DELETED", 9),
    ],
    ids=["details", "actor", "delete", "delete-last"],
)
def test_verify_finds_tampering_in_the_database(
    busy: RunningServer, statement: str, problem: str, sequence: int
) -> None:
    with posguard.Client(busy.target, api_key=busy.key("auditor")) as auditor:
        assert auditor.verify_audit_log().intact
        _tamper(busy, statement)
        report = auditor.verify_audit_log()
    assert not report.intact
    assert report.problem == admin_pb2.AuditProblem.Value(f"AUDIT_PROBLEM_{problem}")
    assert report.first_bad_sequence == sequence
    assert f"event {sequence}" in report.detail


def test_verify_finds_two_events_that_traded_places(busy: RunningServer) -> None:
    _tamper(busy, "UPDATE audit_events SET sequence = -1 WHERE sequence = 3")
    _tamper(busy, "UPDATE audit_events SET sequence = 3 WHERE sequence = 4")
    _tamper(busy, "UPDATE audit_events SET sequence = 4 WHERE sequence = -1")
    with posguard.Client(busy.target, api_key=busy.key("auditor")) as auditor:
        report = auditor.verify_audit_log()
    assert (report.problem, report.first_bad_sequence) == (admin_pb2.AUDIT_PROBLEM_REORDERED, 3)


@pytest.mark.parametrize(
    ("rpc", "fields", "field"),
    [
        ("list_audit_events", {"page_size": -1}, "page_size"),
        ("list_audit_events", {"page_token": "not-a-token"}, "page_token"),
        ("list_audit_events", {"action": "a" * 65}, "action"),
        ("list_audit_events", {"actor": "a" * 65}, "actor"),
        ("list_audit_events", {"subject": "s" * 129}, "subject"),
        ("list_audit_events", {"subject": "tab\there"}, "subject"),
        (
            "list_audit_events",
            {
                "occurred_after": Timestamp(seconds=1_700_000_100),
                "occurred_before": Timestamp(seconds=1_700_000_000),
            },
            "occurred_before",
        ),
        ("list_audit_events", {"occurred_after": Timestamp(seconds=10**15)}, "occurred_after"),
        ("verify_audit_log", {"from_sequence": -1}, "from_sequence"),
    ],
    ids=[
        "negative-page-size",
        "garbage-token",
        "long-action",
        "long-actor",
        "long-subject",
        "control-char",
        "range-backwards",
        "time-out-of-range",
        "negative-from-sequence",
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(
    busy: RunningServer, rpc: str, fields: dict[str, Any], field: str
) -> None:
    with posguard.Client(busy.target, api_key=busy.key("auditor")) as auditor:
        before = _all_events(auditor)
        with pytest.raises(posguard.InvalidArgumentError) as caught:
            getattr(auditor, rpc)(**fields)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in caught.value.field_violations] == [field]
        assert _all_events(auditor) == before
        assert auditor.verify_audit_log().intact


def test_a_page_token_only_fits_the_filters_it_was_made_for(busy: RunningServer) -> None:
    with posguard.Client(busy.target, api_key=busy.key("auditor")) as auditor:
        token = auditor.list_audit_events(page_size=1, action="api_key.created").next_page_token
        assert auditor.list_audit_events(page_size=1, action="api_key.created", page_token=token).events
        with pytest.raises(posguard.InvalidArgumentError) as caught:
            auditor.list_audit_events(page_size=1, page_token=token)
        assert [v.field for v in caught.value.field_violations] == ["page_token"]


def test_an_empty_range_is_allowed(busy: RunningServer) -> None:
    moment = _stamp(datetime(2025, 1, 1, tzinfo=UTC))
    with posguard.Client(busy.target, api_key=busy.key("auditor")) as auditor:
        answer = auditor.list_audit_events(occurred_after=moment, occurred_before=moment)
    assert list(answer.events) == []
    assert answer.next_page_token == ""


# -- the command line ----------------------------------------------------------------------------------


@pytest.fixture
def database_file(tmp_path: Path) -> str:
    """A migrated SQLite database with a few audited key changes."""
    url = f"sqlite:///{tmp_path}/cli.db"
    upgrade(url)
    database = Database(url)
    try:
        keys = SqlApiKeyStore(database)
        made = [create_key(keys, name=f"k{i}", role=Role.GATEWAY, created_by="cli")[0] for i in range(3)]
        keys.revoke(made[0].key_id, revoked_by="cli", reason="test", now=datetime.now(UTC))
    finally:
        database.dispose()
    return url


def _run(url: str, *args: str) -> Any:
    return CliRunner().invoke(main, ["--database-url", url, "audit", *args], catch_exceptions=False)


def test_cli_verify_exits_0_when_intact(database_file: str) -> None:
    result = _run(database_file, "verify")
    assert result.exit_code == 0, result.output
    assert "intact" in result.output
    assert "4 events" in result.output
    answer = json.loads(_run(database_file, "verify", "--json").output)
    assert answer == {
        "intact": True,
        "entries_checked": 4,
        "first_bad_sequence": 0,
        "problem": "none",
        "detail": answer["detail"],
    }
    assert _run(database_file, "verify", "--from-sequence", "3").exit_code == 0


@pytest.mark.parametrize(
    ("statement", "problem", "sequence"),
    [
        ("UPDATE audit_events SET subject = 'x' WHERE sequence = 2", "edited", 2),
        ("DELETE FROM audit_events WHERE sequence = 3", "deleted", 3),
    ],
    ids=["edited", "deleted"],
)
def test_cli_verify_exits_3_and_says_where_when_broken(
    database_file: str, statement: str, problem: str, sequence: int
) -> None:
    database = Database(database_file)
    try:
        with database.engine.begin() as connection:
            connection.execute(text(statement))
    finally:
        database.dispose()
    result = _run(database_file, "verify")
    assert result.exit_code == 3
    assert f"BROKEN at event {sequence} ({problem})" in result.output
    answer = json.loads(_run(database_file, "verify", "--json").output)
    assert (answer["intact"], answer["problem"], answer["first_bad_sequence"]) == (False, problem, sequence)
    assert _run(database_file, "verify", "--json").exit_code == 3


def test_cli_verify_refuses_a_negative_start(database_file: str) -> None:
    result = _run(database_file, "verify", "--from-sequence", "-1")
    assert result.exit_code == 2


def test_cli_list_filters_and_prints_json_lines(database_file: str) -> None:
    result = _run(database_file, "list", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["sequence"] for r in rows] == [1, 2, 3, 4]
    assert rows[3]["action"] == "api_key.revoked"
    assert rows[3]["details"] == {"reason": "test"}
    assert rows[1]["previous_hash"] == rows[0]["hash"]

    revoked = _run(database_file, "list", "--action", "api_key.revoked", "--json").output.splitlines()
    assert [json.loads(line)["sequence"] for line in revoked] == [4]
    limited = _run(database_file, "list", "--limit", "2", "--json").output.splitlines()
    assert len(limited) == 2
    about = _run(database_file, "list", "--subject", rows[0]["subject"], "--actor", "cli", "--json")
    assert [json.loads(line)["sequence"] for line in about.output.splitlines()] == [1, 4]
    table = _run(database_file, "list").output
    assert "api_key.created" in table
    assert rows[0]["subject"] in table
