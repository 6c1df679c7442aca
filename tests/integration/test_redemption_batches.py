"""RedeemDynamicCode in batches: a batch is judged in order in one transaction, and a code still pays once.

The store test hands ``redeem_many`` a batch directly, as the group commit would under load; the server
test races one code through two servers on one database.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import func, select

import posguard
from posguard.dynamic_codes import time_step
from posguard.v1 import customer_ids_pb2
from posguard_server.domain.dynamic_codes import Reason, SecretCipher, parse_code
from posguard_server.domain.enumeration import FailureLimit
from posguard_server.domain.errors import InvalidArgument
from posguard_server.issuers import build_numbering
from posguard_server.store.audit import SqlAuditEvent
from posguard_server.store.caller_limits import SqlCallerFailures
from posguard_server.store.dynamic_codes import Attempt, SqlDynamicCodeAttempt, SqlDynamicCodeUse
from posguard_server.store.migrate import upgrade
from posguard_server.store.redemptions import Redeemed, Redemption, SqlRedemptionStore

if TYPE_CHECKING:
    from collections.abc import Callable

    from .conftest import RunningServer

R = customer_ids_pb2.RedemptionReason


pytestmark = pytest.mark.usefixtures("not_at_a_step_edge")


def _count(server: RunningServer, model: type) -> int:
    with server.server.database.session(read_only=True) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def _redemption(code: str, request_id: str, actor: str, merchant: str = "m-1") -> Redemption:
    now = datetime.now(UTC)
    attempt = Attempt(
        request_id=request_id,
        fingerprint=f"{code}/{merchant}",
        expected_number=None,
        merchant_id=merchant,
        terminal_id="",
        amount=None,
        actor=actor,
    )
    return Redemption(parse_code(code), attempt, now, time_step(now))


def test_one_batch_judges_in_order_counts_guesses_and_refuses_past_the_limit(
    server_factory: Callable[..., RunningServer], database_url: str
) -> None:
    upgrade(database_url)
    server = server_factory(database_url=database_url, failure_limit=0)
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        secret = client.enroll_dynamic_codes(number=client.issue_customer_id().customer.primary.number).secret
    code = posguard.dynamic_code(secret)
    cipher = SecretCipher(dict(build_numbering(server.settings).keys.keys))
    store = SqlRedemptionStore(
        server.server.database,
        cipher.decrypt,
        FailureLimit(2, timedelta(minutes=1)),
        code_limit=FailureLimit(0, timedelta(minutes=1)),
    )
    guesses = [_redemption(f"28{n:016d}", f"guess-{n}", "attacker") for n in range(4)]
    batch = [
        _redemption(code, "pay-1", "till"),
        _redemption(code, "pay-2", "till"),  # the same code again, in the same batch
        _redemption(code, "pay-1", "till"),  # a retry of the first: its answer again
        _redemption(code, "pay-1", "till", merchant="m-2"),  # the same request_id for another request
        *guesses,
    ]
    results = store.redeem_many(batch)
    first, again, retry, conflict, *guessed = results
    assert isinstance(first, Redeemed)
    assert first.answer is not None
    assert first.answer.reason is Reason.OK
    assert isinstance(again, Redeemed)
    assert again.answer is not None
    assert again.answer.reason is Reason.ALREADY_USED
    assert retry == Redeemed(replace(first.answer, replayed=True))
    assert isinstance(conflict, InvalidArgument)
    assert all(isinstance(g, Redeemed) for g in guessed)
    assert [_outcome(g) for g in guessed] == [
        (Reason.UNKNOWN_CODE, False),
        (Reason.UNKNOWN_CODE, True),  # the second guess reaches the limit of 2
        (None, True),  # refused: nothing is recorded
        (None, True),
    ]
    assert _count(server, SqlDynamicCodeUse) == 1
    assert _count(server, SqlDynamicCodeAttempt) == 4  # pay-1, pay-2 and the two guesses judged
    with server.server.database.session(read_only=True) as session:
        row = session.get(SqlCallerFailures, "attacker")
        assert row is not None
        assert (row.window_failures, row.times_refused) == (2, 1)
        refusals = session.scalar(
            select(func.count()).select_from(SqlAuditEvent).where(SqlAuditEvent.action == "caller.refused")
        )
    assert refusals == 1


def _outcome(result: object) -> tuple[Reason | None, bool]:
    """A redemption's reason (None: refused, not judged) and whether its caller is refused after it."""
    assert isinstance(result, Redeemed)
    return (result.answer.reason if result.answer else None), result.refused_until is not None


def test_one_code_raced_through_two_servers_pays_exactly_once(
    server_factory: Callable[..., RunningServer], database_url: str
) -> None:
    upgrade(database_url)
    servers = [server_factory(database_url=database_url) for _ in range(2)]
    key = servers[0].key("gateway")
    with posguard.Client(servers[0].target, api_key=key) as client:
        secret = client.enroll_dynamic_codes(number=client.issue_customer_id().customer.primary.number).secret
    code = posguard.dynamic_code(secret)
    reasons: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def redeem(worker: int) -> None:
        with posguard.Client(servers[worker % 2].target, api_key=key) as client:
            start.wait()
            answer = client.redeem_dynamic_code(code=code, merchant_id="m-1", request_id=f"pay-{worker}")
            with lock:
                reasons.append(answer.reason)

    threads = [threading.Thread(target=redeem, args=(w,)) for w in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(reasons) == sorted([R.REDEMPTION_REASON_OK] + [R.REDEMPTION_REASON_ALREADY_USED] * 15)
    assert _count(servers[0], SqlDynamicCodeUse) == 1
    assert _count(servers[0], SqlDynamicCodeAttempt) == 16
