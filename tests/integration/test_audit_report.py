"""``posguard-server audit report``: what the audit job shows operators, from a real server's database."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from click.testing import CliRunner
from sqlalchemy import select, update

import posguard
from posguard_server.cli import main
from posguard_server.domain.check_digits import compute
from posguard_server.store.customers import SqlCustomerNumber

if TYPE_CHECKING:
    from .conftest import RunningServer


def report(server: RunningServer, *args: str) -> tuple[int, dict[str, object]]:
    result = CliRunner().invoke(
        main, ["--data-dir", str(server.settings.data_dir), "audit", "report", "--json", *args]
    )
    return result.exit_code, json.loads(result.stdout)


def test_report_lists_heavily_verified_failing_and_dormant_numbers(server: RunningServer) -> None:
    key = server.key("gateway")
    with posguard.Client(server.target, api_key=key) as client:
        numbers = [client.issue_customer_id().customer.primary.number for _ in range(3)]
        for _ in range(5):
            client.verify_customer_id(number=numbers[0])
        forged = numbers[1][:10] + "11111111"
        forged += compute(forged)
        for _ in range(2):
            client.verify_customer_id(number=forged)
    server.run(server.server.flush())  # successes are counted just after their answers
    code, data = report(server, "--dormant-days", "1")
    assert code == 0
    assert data["numbers_checked"] == 3
    assert data["duplicates"] == []
    assert data["one_keystroke_apart"] == []
    most = data["most_verified"]
    assert isinstance(most, list)
    assert most[0]["number"] == numbers[0][:4] + "*" * 12 + numbers[0][-4:]
    assert most[0]["verifications"] == 5
    assert data["failing_callers"] == [[key.split("_")[1], 2]]
    assert data["dormant"] == []  # all issued today

    # Age the third number: issued and never presented for 100 days.
    from datetime import UTC, datetime, timedelta

    old = datetime.now(UTC) - timedelta(days=100)
    with server.server.database.session() as session:
        session.execute(
            update(SqlCustomerNumber)
            .where(SqlCustomerNumber.number == numbers[2])
            .values(issued_at=old, status_changed_at=old)
        )
    _, data = report(server, "--dormant-days", "90")
    dormant = data["dormant"]
    assert isinstance(dormant, list)
    assert [d["number"][-4:] for d in dormant] == [numbers[2][-4:]]


def test_report_flags_numbers_one_keystroke_apart(server: RunningServer) -> None:
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        number = client.issue_customer_id().customer.primary.number
        second = client.issue_customer_id().customer.primary.number
    code, data = report(server)
    assert code == 0
    assert data["one_keystroke_apart"] == []
    # Tamper as a forger outside the scheme would: the second number becomes a one-digit slip of the first.
    twin = number[:12] + str((int(number[12]) + 1) % 10) + number[13:]
    with server.server.database.session() as session:
        session.execute(
            update(SqlCustomerNumber).where(SqlCustomerNumber.number == second).values(number=twin)
        )
    code, data = report(server)
    assert code == 3  # it ran; the answer is no
    (pair,) = data["one_keystroke_apart"]  # type: ignore[misc]
    with server.server.database.session(read_only=True) as session:
        owners = set(session.scalars(select(SqlCustomerNumber.customer_id)))
    assert {entry.split(" ")[1] for entry in pair} == owners
    assert all(entry.startswith(number[:4] + "*" * 12) for entry in pair)
