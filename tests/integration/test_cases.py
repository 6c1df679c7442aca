"""Review cases end to end: scoring opens them, analysts work them; a real server on SQLite and PostgreSQL.

No model is trained here, so every score is the no-model decision (REVIEW by default): each new transaction
is a case, and the tests can say exactly how many cases there must be.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import func, select

import posguard
from posguard.v1 import cases_pb2, common_pb2, risk_pb2
from posguard_server.domain.risk import Outcome
from posguard_server.store.audit import SqlAuditEvent
from posguard_server.store.cases import SqlCase
from posguard_server.store.migrate import upgrade
from posguard_server.store.outcomes import SqlOutcomeStore
from posguard_server.store.risk_tables import SqlRiskOutcomeReport, SqlRiskTransaction

if TYPE_CHECKING:
    from .conftest import RunningServer

C = cases_pb2


@pytest.fixture
def running(server_factory: Callable[..., RunningServer], database_url: str) -> RunningServer:
    upgrade(database_url)
    return server_factory(database_url=database_url)


def stamp(value: datetime) -> Timestamp:
    result = Timestamp()
    result.FromDatetime(value)
    return result


def txn(number: str, **fields: Any) -> risk_pb2.Transaction:
    base: dict[str, Any] = {
        "transaction_id": "tx-" + uuid.uuid4().hex,
        "customer_number": number,
        "amount": common_pb2.Money(amount_minor=12_50, currency="CNY"),
        "merchant_id": "m-1",
        "terminal_id": "t-1",
        "mcc": "5411",
        "channel": common_pb2.CHANNEL_POS,
        "event_time": stamp(datetime.now(UTC) - timedelta(minutes=1)),
    }
    base.update(fields)
    return risk_pb2.Transaction(**base)


def new_number(server: RunningServer) -> tuple[str, str]:
    """A new customer: (customer id, primary number)."""
    with posguard.Client(server.target, api_key=server.key("gateway"), timeout=10) as client:
        customer = client.issue_customer_id().customer
    return customer.customer_id, customer.primary.number


def score(server: RunningServer, transaction: risk_pb2.Transaction, **fields: Any) -> Any:
    with posguard.Client(server.target, api_key=server.key("gateway"), timeout=30) as client:
        return client.score_transaction(transaction=transaction, **fields)


def cases_of(server: RunningServer, transaction_id: str) -> int:
    with server.server.database.session(read_only=True) as session:
        return int(
            session.scalar(
                select(func.count()).select_from(SqlCase).where(SqlCase.transaction_id == transaction_id)
            )
            or 0
        )


def analyst(server: RunningServer) -> posguard.Client:
    return posguard.Client(server.target, api_key=server.key("analyst"), timeout=10)


def test_a_review_opens_one_case_and_its_replays_open_none(running: RunningServer) -> None:
    customer_id, number = new_number(running)
    transaction = txn(number)
    first = score(running, transaction)
    assert first.decision == risk_pb2.DECISION_REVIEW
    assert cases_of(running, transaction.transaction_id) == 1
    # Replays by transaction id, with and without a request id of their own: the stored answer, no case.
    assert score(running, transaction).replayed
    assert score(running, transaction, request_id="retry-1").replayed
    assert score(running, transaction, request_id="retry-1").replayed
    assert cases_of(running, transaction.transaction_id) == 1

    with analyst(running) as client:
        listed = client.list_cases()
        (case,) = listed.cases
        assert case.kind == C.CASE_KIND_TRANSACTION
        assert case.status == C.CASE_STATUS_OPEN
        assert (case.customer_id, case.transaction_id) == (customer_id, transaction.transaction_id)
        assert case.decision == risk_pb2.DECISION_REVIEW
        assert [r.code for r in case.reasons] == [r.code for r in first.reasons]
        assert case.opened_at.ToDatetime(tzinfo=UTC) == first.scored_at.ToDatetime(tzinfo=UTC)


def test_concurrent_scores_of_one_transaction_open_one_case(running: RunningServer) -> None:
    _, number = new_number(running)
    transaction = txn(number)
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda i: score(running, transaction, request_id=f"race-{i}"), range(16)))
    assert sum(not answer.replayed for answer in answers) == 1
    assert cases_of(running, transaction.transaction_id) == 1
    # A stream that sends the same transaction several times, and new ones beside it: one case each.
    others = [txn(number) for _ in range(3)]
    requests = [risk_pb2.ScoreTransactionsRequest(transaction=t) for t in [transaction, *others, *others]]
    with posguard.Client(running.target, api_key=running.key("gateway"), timeout=30) as client:
        responses = list(client.score_transactions(iter(requests)))
    assert all(r.WhichOneof("outcome") == "result" for r in responses)
    assert [cases_of(running, t.transaction_id) for t in [transaction, *others]] == [1, 1, 1, 1]


def test_approvals_open_no_case_and_declines_only_by_setting(
    server_factory: Callable[..., RunningServer], database_url: str
) -> None:
    upgrade(database_url)
    approving = server_factory(database_url=database_url, risk_no_model_decision="approve")
    declining = server_factory(database_url=database_url, risk_no_model_decision="decline")
    declining_cases = server_factory(
        database_url=database_url, risk_no_model_decision="decline", cases_on_decline=True
    )
    _, number = new_number(approving)
    approved, declined, declined_with_case = txn(number), txn(number), txn(number)
    assert score(approving, approved).decision == risk_pb2.DECISION_APPROVE
    assert score(declining, declined).decision == risk_pb2.DECISION_DECLINE
    assert score(declining_cases, declined_with_case).decision == risk_pb2.DECISION_DECLINE
    assert [cases_of(approving, t.transaction_id) for t in (approved, declined, declined_with_case)] == [
        0,
        0,
        1,
    ]
    # A revoked number declines by rule: a case too, under the setting.
    with posguard.Client(approving.target, api_key=approving.key("admin"), timeout=10) as admin:
        admin.revoke_customer_id(number=number, reason="closed")
    revoked = txn(number)
    answer = score(declining_cases, revoked)
    assert answer.decision == risk_pb2.DECISION_DECLINE
    assert cases_of(approving, revoked.transaction_id) == 1


def test_get_assign_and_list_with_filters(running: RunningServer) -> None:
    customer_id, number = new_number(running)
    earlier = [txn(number, merchant_id=f"m-{i}") for i in range(3)]
    for transaction in earlier:
        score(running, transaction)
    latest = txn(number, merchant_id="m-late", amount=common_pb2.Money(amount_minor=99_00, currency="CNY"))
    score(running, latest)
    with analyst(running) as client:
        cases = client.list_cases().cases
        assert [c.transaction_id for c in cases] == [t.transaction_id for t in [*earlier, latest]]
        case_id = cases[-1].case_id

        detail = client.get_case(case_id=case_id)
        assert detail.transaction.transaction_id == latest.transaction_id
        assert detail.transaction.merchant_id == "m-late"
        assert detail.transaction.amount.amount_minor == 99_00
        assert detail.transaction.decision == risk_pb2.DECISION_REVIEW
        assert [r.code for r in detail.transaction.reasons] == [r.code for r in detail.case.reasons]
        # The customer's other transactions, newest first.
        assert [t.transaction_id for t in detail.recent_transactions] == [
            t.transaction_id for t in reversed(earlier)
        ]

        assigned = client.assign_case(case_id=case_id).case
        assert assigned.status == C.CASE_STATUS_ASSIGNED
        assert assigned.assignee == running.key("analyst").split("_")[1]  # the caller's key id
        reassigned = client.assign_case(case_id=case_id, assignee="ada").case
        assert reassigned.assignee == "ada"

        assert [c.case_id for c in client.list_cases(assignee="ada").cases] == [case_id]
        assert len(client.list_cases(status=C.CASE_STATUS_OPEN).cases) == 3
        assert [c.case_id for c in client.list_cases(status=C.CASE_STATUS_ASSIGNED).cases] == [case_id]
        code = cases[0].reasons[0].code
        assert len(client.list_cases(reason=code).cases) == 4
        assert client.list_cases(reason="NO_SUCH_REASON").cases == []
        future = datetime.now(UTC) + timedelta(hours=1)
        assert client.list_cases(opened_after=stamp(future)).cases == []
        assert len(client.list_cases(opened_before=stamp(future)).cases) == 4
        assert client.list_cases(kind=C.CASE_KIND_NUMBER_WATCH).cases == []

        # Pages: oldest first, a token bound to its filters.
        first = client.list_cases(page_size=3)
        assert len(first.cases) == 3
        assert first.next_page_token
        second = client.list_cases(page_size=3, page_token=first.next_page_token)
        assert [c.case_id for c in second.cases] == [case_id]
        assert second.next_page_token == ""
        with pytest.raises(posguard.InvalidArgumentError) as bad_token:
            client.list_cases(page_size=3, page_token=first.next_page_token, status=C.CASE_STATUS_OPEN)
        assert [v.field for v in bad_token.value.field_violations] == ["page_token"]
        with pytest.raises(posguard.InvalidArgumentError) as bad:
            client.list_cases(reason="lower case", assignee="x" * 101)
        assert sorted(v.field for v in bad.value.field_violations) == ["assignee", "reason"]
        with pytest.raises(posguard.NotFoundError):
            client.get_case(case_id="0" * 16)
    assert customer_id


def test_resolving_records_the_outcome_as_report_outcome_does(running: RunningServer) -> None:
    _, number = new_number(running)
    by_case, by_report = txn(number, terminal_id="t-9"), txn(number, terminal_id="t-9")
    score(running, by_case)
    score(running, by_report)
    audit_before = _audit(running, "case.resolved")
    with analyst(running) as client:
        case = next(c for c in client.list_cases().cases if c.transaction_id == by_case.transaction_id)
        with pytest.raises(posguard.InvalidArgumentError) as wrong_kind:
            client.resolve_case(case_id=case.case_id, resolution=C.CASE_RESOLUTION_ROTATE)
        assert [v.field for v in wrong_kind.value.field_violations] == ["resolution"]
        resolved = client.resolve_case(
            request_id="resolve-1",
            case_id=case.case_id,
            resolution=C.CASE_RESOLUTION_FRAUD,
            note="cardholder denies it",
        )
        assert not resolved.replayed
        assert resolved.case.status == C.CASE_STATUS_RESOLVED
        assert resolved.case.resolution == C.CASE_RESOLUTION_FRAUD
        assert resolved.case.note == "cardholder denies it"
        assert resolved.case.resolved_by == running.key("analyst").split("_")[1]
        again = client.resolve_case(
            request_id="resolve-1",
            case_id=case.case_id,
            resolution=C.CASE_RESOLUTION_FRAUD,
            note="cardholder denies it",
        )
        assert again.replayed
        assert again.case == resolved.case
        with pytest.raises(posguard.FailedPreconditionError) as twice:
            client.resolve_case(case_id=case.case_id, resolution=C.CASE_RESOLUTION_LEGITIMATE)
        assert twice.value.reason == "CASE_RESOLVED"
        with pytest.raises(posguard.FailedPreconditionError):
            client.assign_case(case_id=case.case_id)
        detail = client.get_case(case_id=case.case_id)
        assert detail.transaction.outcome == risk_pb2.OUTCOME_FRAUD

    with posguard.Client(running.target, api_key=running.key("gateway"), timeout=10) as gateway:
        gateway.report_outcome(
            transaction_id=by_report.transaction_id,
            outcome=risk_pb2.OUTCOME_FRAUD,
            note="cardholder denies it",
        )
    # The two labels are stored alike: on the transaction, and as a report.
    with running.server.database.session(read_only=True) as session:
        rows = {
            row.transaction_id: row
            for row in session.scalars(
                select(SqlRiskTransaction).where(
                    SqlRiskTransaction.transaction_id.in_([by_case.transaction_id, by_report.transaction_id])
                )
            )
        }
        reports = {
            r.transaction_id: r
            for r in session.scalars(select(SqlRiskOutcomeReport))
            if r.transaction_id in rows
        }
        for transaction_id in rows:
            assert (rows[transaction_id].outcome, rows[transaction_id].outcome_note) == (
                Outcome.FRAUD.value,
                "cardholder denies it",
            )
            assert rows[transaction_id].outcome_at is not None
            assert reports[transaction_id].outcome == Outcome.FRAUD.value
        assert reports[by_case.transaction_id].caller == running.key("analyst").split("_")[1]
    # Training and terminal evidence read labels from one place: both are there.
    labelled = {t.transaction_id for t in SqlOutcomeStore(running.server.database).labelled()}
    assert {by_case.transaction_id, by_report.transaction_id} <= labelled
    assert len(_audit(running, "case.resolved")) == len(audit_before) + 1
    event = _audit(running, "case.resolved")[-1]
    assert event.subject == case.case_id
    assert '"resolution":"fraud"' in event.details


def test_a_legitimate_resolution_labels_legitimate(running: RunningServer) -> None:
    _, number = new_number(running)
    transaction = txn(number)
    score(running, transaction)
    with analyst(running) as client:
        (case,) = client.list_cases().cases
        client.resolve_case(case_id=case.case_id, resolution=C.CASE_RESOLUTION_LEGITIMATE)
        assert client.get_case(case_id=case.case_id).transaction.outcome == risk_pb2.OUTCOME_LEGITIMATE


def test_an_analyst_key_reaches_cases_and_nothing_else(running: RunningServer) -> None:
    _, number = new_number(running)
    with analyst(running) as client:
        assert client.list_cases().cases == []
        for call in (
            lambda: client.score_transaction(transaction=txn(number)),
            lambda: client.verify_customer_id(number=number),
            lambda: client.report_outcome(transaction_id="tx-1", outcome=risk_pb2.OUTCOME_FRAUD),
            lambda: client.list_audit_events(),
        ):
            with pytest.raises(posguard.PosguardError) as refused:
                call()
            assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED


def _audit(server: RunningServer, action: str) -> list[SqlAuditEvent]:
    with server.server.database.session(read_only=True) as session:
        return list(
            session.scalars(
                select(SqlAuditEvent).where(SqlAuditEvent.action == action).order_by(SqlAuditEvent.sequence)
            )
        )
