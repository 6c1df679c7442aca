"""ScoreTransaction as one unit of work, on SQLite and on PostgreSQL: what decides a score is read in the
transaction that stores it, and a score that fails keeps nothing, not even its dynamic code's redemption.

Races run with real threads against a real server; where the window is narrow it is opened on purpose, by
making a status change from another thread at the moment the scoring transaction takes its locks.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import func, select

import posguard
from posguard.dynamic_codes import PERIOD_SECONDS
from posguard.v1 import common_pb2, risk_pb2
from posguard_server.domain.customers import Transition
from posguard_server.domain.errors import InvalidArgument, Unavailable
from posguard_server.scoring import RiskEngine, TransactionInput
from posguard_server.services.scoring import Payer, ScoreCall, Scoring, ScoringService
from posguard_server.store.customers import SqlCustomerStore
from posguard_server.store.dynamic_codes import SqlDynamicCodeAttempt, SqlDynamicCodeUse
from posguard_server.store.risk_tables import SqlRiskTransaction
from posguard_server.store.scoring_writes import ScoringUnit

if TYPE_CHECKING:
    from .conftest import RunningServer

R = risk_pb2


@pytest.fixture
def running(migrated_server: RunningServer) -> RunningServer:
    return migrated_server


@pytest.fixture
def clients(running: RunningServer) -> Iterator[tuple[posguard.Client, posguard.Client]]:
    with (
        posguard.Client(running.target, api_key=running.key("gateway")) as gateway,
        posguard.Client(running.target, api_key=running.key("admin")) as admin,
    ):
        yield gateway, admin


def txn(**fields: Any) -> R.Transaction:
    base: dict[str, Any] = {
        "transaction_id": "tx-" + uuid.uuid4().hex,
        "amount": common_pb2.Money(amount_minor=12_50, currency="CNY"),
        "merchant_id": "m-1",
        "terminal_id": "t-1",
        "channel": common_pb2.CHANNEL_POS,
    }
    base.update(fields)
    when = R.Transaction().event_time
    when.FromDatetime(datetime.now(UTC))
    return R.Transaction(event_time=when, **base)


def count(server: RunningServer, model: type) -> int:
    with server.server.database.session(read_only=True) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def _reason(answer: R.ScoreTransactionResponse) -> str:
    return answer.reasons[0].code if answer.reasons else ""


def _revoke(running: RunningServer, number: str) -> None:
    """Revoke ``number`` straight through the store, in a transaction of its own (as RevokeCustomerId)."""

    def no_new_number(prefix: str, counter: int) -> tuple[str, int]:
        raise AssertionError("a revoke issues no number")

    SqlCustomerStore(running.server.database).transition(
        number,
        Transition.REVOKE,
        reason="race",
        request_id=uuid.uuid4().hex,
        fingerprint="f" * 64,
        actor="test",
        now=datetime.now(UTC),
        make_number=no_new_number,
    )


def test_a_revoke_landing_before_the_lock_is_seen_by_the_score(
    running: RunningServer,
    clients: tuple[posguard.Client, posguard.Client],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway, _ = clients
    customer = gateway.issue_customer_id().customer
    number = customer.primary.number
    lock_customers = ScoringUnit.lock_customers
    revoker: list[threading.Thread] = []

    def revoke_first(unit: ScoringUnit, customer_ids: set[str]) -> set[str]:
        # The number has been read (active) and its customer is about to be locked: revoke it now, from
        # another connection, and give the revoke the time it needs to commit.
        if not revoker:
            revoker.append(threading.Thread(target=_revoke, args=(running, number)))
            revoker[0].start()
            revoker[0].join(timeout=2)
        return lock_customers(unit, customer_ids)

    monkeypatch.setattr(ScoringUnit, "lock_customers", revoke_first)
    answer = gateway.score_transaction(transaction=txn(customer_number=number))
    revoker[0].join(timeout=10)
    assert not revoker[0].is_alive()
    if database_url.startswith("sqlite"):
        # SQLite's writer lock, taken when the scoring transaction began, holds the revoke back until the
        # score committed: the score comes first, and saw an active number.
        assert _reason(answer) not in {"NUMBER_REVOKED"}
    else:
        # PostgreSQL let the revoke commit before the customer was locked: the score must see it.
        assert _reason(answer) == "NUMBER_REVOKED"
        assert answer.decision == R.DECISION_DECLINE
    monkeypatch.undo()
    after = gateway.score_transaction(transaction=txn(customer_number=number))
    assert _reason(after) == "NUMBER_REVOKED"


def test_scores_racing_a_revoke_never_pass_after_it(
    running: RunningServer, clients: tuple[posguard.Client, posguard.Client]
) -> None:
    """Gateways score one customer from several threads while an operator revokes its number."""
    gateway, admin = clients
    customer = gateway.issue_customer_id().customer
    number = customer.primary.number
    revoked_at: list[float] = []
    stop = threading.Event()

    def keep_scoring() -> list[tuple[float, str]]:
        seen: list[tuple[float, str]] = []
        while not stop.is_set():
            sent = time.monotonic()
            seen.append((sent, _reason(gateway.score_transaction(transaction=txn(customer_number=number)))))
        return seen

    with ThreadPoolExecutor(4) as pool:
        scorers = [pool.submit(keep_scoring) for _ in range(4)]
        time.sleep(0.5)
        admin.revoke_customer_id(number=number, reason="race")
        revoked_at.append(time.monotonic())
        time.sleep(0.5)
        stop.set()
        answers = [answer for scorer in scorers for answer in scorer.result()]
    # A score sent after the revoke returned (so after it committed) must decline; before, either may be.
    after = [reason for sent, reason in answers if sent > revoked_at[0]]
    assert after
    assert set(after) == {"NUMBER_REVOKED"}
    assert any(reason != "NUMBER_REVOKED" for sent, reason in answers if sent < revoked_at[0])


def _fail_evaluate(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("scoring failed")

    monkeypatch.setattr(RiskEngine, "finish", broken)


def _fail_write(monkeypatch: pytest.MonkeyPatch) -> None:
    score = ScoringUnit.score

    def refused(unit: ScoringUnit, *args: Any, **kwargs: Any) -> Any:
        score(unit, *args, **kwargs)  # everything is written, then the database goes away
        raise Unavailable("the database is unavailable; retry later", reason="STORAGE_UNAVAILABLE")

    monkeypatch.setattr(ScoringUnit, "score", refused)


@pytest.mark.usefixtures("not_at_a_step_edge")
@pytest.mark.parametrize("failure", [_fail_evaluate, _fail_write], ids=["evaluate_raises", "write_refused"])
def test_a_failed_score_does_not_spend_its_dynamic_code(
    running: RunningServer,
    clients: tuple[posguard.Client, posguard.Client],
    monkeypatch: pytest.MonkeyPatch,
    failure: Callable[[pytest.MonkeyPatch], None],
) -> None:
    gateway, _ = clients
    customer = gateway.issue_customer_id().customer
    secret = gateway.enroll_dynamic_codes(number=customer.primary.number).secret
    transaction = txn(dynamic_code=posguard.dynamic_code(secret))
    failure(monkeypatch)
    with pytest.raises(posguard.PosguardError):
        gateway.score_transaction(transaction=transaction, request_id="r-" + uuid.uuid4().hex)
    assert count(running, SqlDynamicCodeUse) == 0
    assert count(running, SqlDynamicCodeAttempt) == 0
    assert count(running, SqlRiskTransaction) == 0

    monkeypatch.undo()
    retried = gateway.score_transaction(transaction=transaction, request_id="r-" + uuid.uuid4().hex)
    assert not retried.replayed
    assert retried.customer_id == customer.customer_id
    assert _reason(retried) != "DYNAMIC_CODE_REPLAYED"
    assert count(running, SqlDynamicCodeUse) == 1
    # The code is spent now: the next transaction with it is a replay of the code.
    again = gateway.score_transaction(transaction=txn(dynamic_code=transaction.dynamic_code))
    assert _reason(again) == "DYNAMIC_CODE_REPLAYED"


@pytest.mark.usefixtures("not_at_a_step_edge")
def test_one_code_raced_by_many_transactions_pays_once(
    running: RunningServer, clients: tuple[posguard.Client, posguard.Client]
) -> None:
    gateway, _ = clients
    customer = gateway.issue_customer_id().customer
    secret = gateway.enroll_dynamic_codes(number=customer.primary.number).secret
    code = posguard.dynamic_code(secret)
    with ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(lambda _: gateway.score_transaction(transaction=txn(dynamic_code=code)), range(12))
        )
    reasons = [_reason(answer) for answer in answers]
    assert len([r for r in reasons if r != "DYNAMIC_CODE_REPLAYED"]) == 1
    assert count(running, SqlDynamicCodeUse) == 1
    assert count(running, SqlRiskTransaction) == 12


@pytest.mark.usefixtures("not_at_a_step_edge")
def test_a_conflict_within_one_batch_spends_no_code(
    running: RunningServer, clients: tuple[posguard.Client, posguard.Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two transactions of one batch under one transaction id: the second is refused before its redemption."""
    gateway, _ = clients
    customer = gateway.issue_customer_id().customer
    secret = gateway.enroll_dynamic_codes(number=customer.primary.number).secret
    services: list[ScoringService] = []
    score_in = ScoringService._score_in

    def spy(service: ScoringService, *args: Any) -> list[Scoring]:
        services.append(service)  # the server's own service, to hand it a batch of this test's making
        return score_in(service, *args)

    monkeypatch.setattr(ScoringService, "_score_in", spy)
    gateway.score_transaction(transaction=txn(customer_number=customer.primary.number))
    monkeypatch.undo()

    def call(code: str, amount: int) -> ScoreCall:
        money = (amount, "CNY")
        transaction = TransactionInput(
            transaction_id="tx-same",
            amount_minor=money[0],
            currency=money[1],
            merchant_id="m-1",
            terminal_id="t-1",
            mcc="",
            event_time=datetime.now(UTC),
            channel="POS",
            latitude=None,
            longitude=None,
        )
        return ScoreCall(transaction, Payer(code=code), "", f"{amount:064d}", "test")

    now_code = posguard.dynamic_code(secret)
    next_code = posguard.dynamic_code(secret, at=time.time() + PERIOD_SECONDS)
    first, second = services[0].score_many([call(now_code, 100), call(next_code, 200)])
    assert not isinstance(first.result, Exception)
    assert isinstance(second.result, InvalidArgument)
    assert second.result.reason == "IDEMPOTENCY_CONFLICT"
    assert second.redemption is None
    assert count(running, SqlDynamicCodeUse) == 1
    # The refused transaction's code is still good.
    answer = gateway.score_transaction(transaction=txn(dynamic_code=next_code))
    assert _reason(answer) != "DYNAMIC_CODE_REPLAYED"
    assert count(running, SqlDynamicCodeUse) == 2
