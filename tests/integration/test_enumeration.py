"""Enumeration defence: a key that keeps failing verifications or redemptions is refused, and it shows.

The limit is counted in the database, so two servers on one database count one key's failures together;
the tests below run two servers on the same SQLite file to show it.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import pytest
from click.testing import CliRunner
from sqlalchemy import select

import posguard
from posguard.errors import ResourceExhaustedError
from posguard_server.cli import main
from posguard_server.domain.check_digits import compute
from posguard_server.store.audit import SqlAuditEvent
from posguard_server.store.caller_limits import SqlCallerFailures

if TYPE_CHECKING:
    from collections.abc import Callable

    from .conftest import RunningServer

LIMIT = 5


def _forged(number: str, serial: int) -> str:
    """A well-formed number with valid check digits that was never issued (same prefix, another serial)."""
    body = number[:10] + f"{serial:08d}"
    return body + compute(body)


def _refusals(server: RunningServer) -> list[SqlAuditEvent]:
    with server.server.database.session(read_only=True) as session:
        return list(session.scalars(select(SqlAuditEvent).where(SqlAuditEvent.action == "caller.refused")))


def test_failed_verifications_beyond_the_limit_refuse_the_key_and_only_that_key(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory(failure_limit=LIMIT, failure_window_seconds=60)
    attacker, bystander = server.key("gateway"), server.key("admin")
    with (
        posguard.Client(server.target, api_key=attacker) as client,
        posguard.Client(server.target, api_key=bystander) as other,
    ):
        number = client.issue_customer_id().customer.primary.number
        for serial in range(LIMIT):  # the failures themselves are answered: not valid
            assert not client.verify_customer_id(number=_forged(number, serial)).valid
        with pytest.raises(ResourceExhaustedError) as refused:
            client.verify_customer_id(number=number)  # even a real number: the key is refused
        assert refused.value.reason == "TOO_MANY_FAILURES"
        assert 0 < int(refused.value.metadata["retry_after_seconds"]) <= 60
        assert number not in str(refused.value)
        assert other.verify_customer_id(number=number).valid  # another key is not affected

    events = _refusals(server)
    assert len(events) == 1
    assert events[0].actor == attacker.split("_")[1]
    assert json.loads(events[0].details)["method"] == "VerifyCustomerId"

    result = CliRunner().invoke(
        main, ["--data-dir", str(server.settings.data_dir), "audit", "report", "--json"]
    )
    refused_callers = json.loads(result.stdout)["refused_callers"]
    assert [(caller, times) for caller, times, _ in refused_callers] == [(attacker.split("_")[1], 1)]
    text = CliRunner().invoke(main, ["--data-dir", str(server.settings.data_dir), "audit", "report"]).stdout
    assert "callers refused for too many failures: 1" in text


def test_failed_redemptions_count_too_and_the_window_ends(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory(failure_limit=LIMIT, failure_window_seconds=2)
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        number = client.issue_customer_id().customer.primary.number
        secret = client.enroll_dynamic_codes(number=number).secret
        for guess in range(LIMIT):
            answer = client.redeem_dynamic_code(code=f"28{guess:016d}", merchant_id="m-1")
            assert not answer.redeemed
        with pytest.raises(ResourceExhaustedError) as refused:
            client.redeem_dynamic_code(code=posguard.dynamic_code(secret), merchant_id="m-1")
        assert refused.value.reason == "TOO_MANY_FAILURES"
        time.sleep(2.1)  # the window ends: the key is served again
        assert client.redeem_dynamic_code(code=posguard.dynamic_code(secret), merchant_id="m-1").redeemed
    assert json.loads(_refusals(server)[0].details)["method"] == "RedeemDynamicCode"


def test_two_servers_on_one_database_count_a_key_together(
    server_factory: Callable[..., RunningServer],
) -> None:
    first = server_factory(failure_limit=LIMIT, failure_window_seconds=60)
    second = server_factory(failure_limit=LIMIT, failure_window_seconds=60)  # same data directory
    key = first.key("gateway")
    with (
        posguard.Client(first.target, api_key=key) as a,
        posguard.Client(second.target, api_key=key) as b,
    ):
        number = a.issue_customer_id().customer.primary.number
        for serial in range(LIMIT):  # alternate: neither server sees the limit on its own
            (a if serial % 2 else b).verify_customer_id(number=_forged(number, serial))
        with pytest.raises(ResourceExhaustedError):
            b.verify_customer_id(number=number)  # b counted the failure that reached the limit
        # a learns it from its next guess, which is refused, not counted past the limit.
        assert a.verify_customer_id(number=number).valid  # not a guess: a has not been told yet
        with pytest.raises(ResourceExhaustedError):
            a.verify_customer_id(number=_forged(number, 99))
        with pytest.raises(ResourceExhaustedError):
            a.verify_customer_id(number=number)
    with first.server.database.session(read_only=True) as session:
        assert session.get(SqlCallerFailures, key.split("_")[1]).window_failures == LIMIT
    assert len(_refusals(first)) == 1


def test_a_limit_of_zero_refuses_nobody(server_factory: Callable[..., RunningServer]) -> None:
    server = server_factory(failure_limit=0)
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        number = client.issue_customer_id().customer.primary.number
        for serial in range(3 * LIMIT):
            assert not client.verify_customer_id(number=_forged(number, serial)).valid
        assert client.verify_customer_id(number=number).valid
    assert _refusals(server) == []
