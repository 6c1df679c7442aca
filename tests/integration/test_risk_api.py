"""The Risk service end to end: a real server, the real client, on SQLite and on PostgreSQL.

No model is trained here, so the engine answers from its cold-start policy: these tests check the contract
(validation, resolution, rule declines, idempotency, streaming, labels, profiles), never particular scores.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import func, select

import posguard
from posguard.dynamic_codes import PERIOD_SECONDS
from posguard.errors import from_rpc_error
from posguard.v1 import common_pb2, customer_ids_pb2, risk_pb2, risk_pb2_grpc
from posguard_models.features import Profile
from posguard_server.domain.check_digits import compute
from posguard_server.store.audit import SqlAuditEvent
from posguard_server.store.customers import SqlVerificationFailure
from posguard_server.store.dynamic_codes import SqlDynamicCodeAttempt, SqlDynamicCodeUse
from posguard_server.store.risk_tables import SqlRiskOutcomeReport, SqlRiskProfile, SqlRiskTransaction

if TYPE_CHECKING:
    from .conftest import RunningServer

R = risk_pb2
Money = common_pb2.Money
EXT = common_pb2.ExternalId
Selector = common_pb2.CustomerSelector
IDENTITY_DECLINES = {
    "NUMBER_SUSPENDED",
    "NUMBER_REVOKED",
    "NUMBER_ROTATED",
    "NUMBER_OUT_OF_SCOPE",
    "DYNAMIC_CODE_REPLAYED",
    "DYNAMIC_CODE_EXPIRED",
    "DYNAMIC_CODE_INVALID",
}


@pytest.fixture
def running(migrated_server: RunningServer) -> RunningServer:
    return migrated_server


# -- helpers ------------------------------------------------------------------------------------------


def stamp(value: datetime) -> Timestamp:
    result = Timestamp()
    result.FromDatetime(value)
    return result


_clock = [datetime.now(UTC) - timedelta(days=2)]


def next_time() -> Timestamp:
    """Event times that move forward through the past, as a replayed history would."""
    _clock[0] += timedelta(minutes=7)
    return stamp(_clock[0])


def txn(**fields: Any) -> R.Transaction:
    """A valid transaction (give the customer); any field can be overridden."""
    base: dict[str, Any] = {
        "transaction_id": "tx-" + uuid.uuid4().hex,
        "amount": Money(amount_minor=12_50, currency="CNY"),
        "merchant_id": "m-1",
        "terminal_id": "t-1",
        "mcc": "5411",
        "channel": common_pb2.CHANNEL_POS,
        "location": common_pb2.Location(latitude=30.59, longitude=114.31),
    }
    base.update(fields)
    if "event_time" not in fields:
        base["event_time"] = next_time()
    return R.Transaction(**base)


def count(server: RunningServer, model: type) -> int:
    with server.server.database.session(read_only=True) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def snapshot(server: RunningServer) -> tuple[int, ...]:
    """Everything a call could have written: transactions, profiles, labels, redemptions, failures, audit.

    Except the audit of a miss (``lookup.missed``): a call naming nobody is counted as a guess, on purpose
    (tests/integration/test_guessing.py).
    """
    with server.server.database.session(read_only=True) as session:
        audited = session.scalar(
            select(func.count()).select_from(SqlAuditEvent).where(SqlAuditEvent.action != "lookup.missed")
        )
    return (
        *(
            count(server, model)
            for model in (
                SqlRiskTransaction,
                SqlRiskProfile,
                SqlRiskOutcomeReport,
                SqlDynamicCodeAttempt,
                SqlDynamicCodeUse,
                SqlVerificationFailure,
            )
        ),
        int(audited or 0),
    )


def issue(client: posguard.Client, **fields: Any) -> customer_ids_pb2.Customer:
    customer: customer_ids_pb2.Customer = client.issue_customer_id(**fields).customer
    return customer


def score(client: posguard.Client, transaction: R.Transaction, **fields: Any) -> R.ScoreTransactionResponse:
    answer: R.ScoreTransactionResponse = client.score_transaction(transaction=transaction, **fields)
    return answer


def profile(client: posguard.Client, customer_id: str) -> R.GetCustomerRiskProfileResponse:
    answer: R.GetCustomerRiskProfileResponse = client.get_customer_risk_profile(
        customer=Selector(customer_id=customer_id)
    )
    return answer


def assert_scored(answer: R.ScoreTransactionResponse, customer_id: str) -> None:
    """A model (or the cold-start policy) answered, not an identity rule."""
    assert answer.customer_id == customer_id
    assert 0.0 <= answer.risk_score <= 1.0
    assert answer.decision in (R.DECISION_APPROVE, R.DECISION_REVIEW, R.DECISION_DECLINE)
    assert answer.model.scope in (R.MODEL_SCOPE_CUSTOMER, R.MODEL_SCOPE_GLOBAL, R.MODEL_SCOPE_NONE)
    assert not {r.code for r in answer.reasons} & IDENTITY_DECLINES
    assert answer.HasField("scored_at")


def assert_rule_decline(answer: R.ScoreTransactionResponse, code: str, customer_id: str) -> None:
    assert answer.customer_id == customer_id
    assert answer.decision == R.DECISION_DECLINE
    assert answer.reasons[0].code == code
    assert answer.reasons[0].message
    assert answer.reasons[0].weight == 1.0
    assert answer.model.scope == R.MODEL_SCOPE_NONE
    assert answer.risk_score == 1.0


def raw_call(server: RunningServer, role: str, method: str, request: Any) -> Any:
    """Call an RPC without the client library (which would fill in an empty request_id)."""
    with grpc.insecure_channel(server.target) as channel:
        stub = risk_pb2_grpc.RiskStub(channel)
        try:
            return getattr(stub, method)(
                request, timeout=10, metadata=[("authorization", f"Bearer {server.key(role)}")]
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None


def wrong_check_digits(number: str) -> str:
    return number[:-1] + str((int(number[-1]) + 1) % 10)


# -- ScoreTransaction: bad input ----------------------------------------------------------------------

Mutate = Callable[[R.ScoreTransactionRequest], None]


def _set(path: str, value: Any) -> Mutate:
    """Set ``transaction.<path>`` (dotted) on the request."""

    def mutate(request: R.ScoreTransactionRequest) -> None:
        *parents, last = path.split(".")
        target: Any = request.transaction
        for name in parents:
            target = getattr(target, name)
        if isinstance(value, Timestamp):
            getattr(target, last).CopyFrom(value)
        else:
            setattr(target, last, value)

    return mutate


def _clear(name: str) -> Mutate:
    def mutate(request: R.ScoreTransactionRequest) -> None:
        request.transaction.ClearField(name)  # type: ignore[arg-type]

    return mutate


def _request_id(value: str) -> Mutate:
    def mutate(request: R.ScoreTransactionRequest) -> None:
        request.request_id = value

    return mutate


def _no_transaction(request: R.ScoreTransactionRequest) -> None:
    request.ClearField("transaction")


def _bad_check_digits(request: R.ScoreTransactionRequest) -> None:
    request.transaction.customer_number = wrong_check_digits(request.transaction.customer_number)


def _external(namespace: str, value: str) -> Mutate:
    def mutate(request: R.ScoreTransactionRequest) -> None:
        request.transaction.external_id.CopyFrom(EXT(namespace=namespace, value=value))

    return mutate


def _future(minutes: int) -> Mutate:
    def mutate(request: R.ScoreTransactionRequest) -> None:
        request.transaction.event_time.CopyFrom(stamp(datetime.now(UTC) + timedelta(minutes=minutes)))

    return mutate


SCORE_CASES: list[tuple[str, Mutate, str]] = [
    ("request_id too long", _request_id("r" * 129), "request_id"),
    ("request_id not ascii", _request_id("ключ"), "request_id"),
    ("no transaction", _no_transaction, "transaction"),
    ("no transaction_id", _set("transaction_id", ""), "transaction.transaction_id"),
    ("transaction_id too long", _set("transaction_id", "t" * 129), "transaction.transaction_id"),
    ("transaction_id control", _set("transaction_id", "tx\x07"), "transaction.transaction_id"),
    ("no customer", _clear("customer_number"), "transaction.customer"),
    ("number malformed", _set("customer_number", "1234"), "transaction.customer_number"),
    ("number check digits", _bad_check_digits, "transaction.customer_number"),
    ("number too long", _set("customer_number", "1" * 65), "transaction.customer_number"),
    ("code malformed", _set("dynamic_code", "12345"), "transaction.dynamic_code"),
    ("code too long", _set("dynamic_code", "1" * 65), "transaction.dynamic_code"),
    ("code letters", _set("dynamic_code", "12345678901234567X"), "transaction.dynamic_code"),
    ("external no namespace", _external("", "v"), "transaction.external_id.namespace"),
    ("external bad namespace", _external("Bank", "v"), "transaction.external_id.namespace"),
    ("external no value", _external("bank", ""), "transaction.external_id.value"),
    ("external long value", _external("bank", "v" * 257), "transaction.external_id.value"),
    ("no amount", _clear("amount"), "transaction.amount"),
    ("zero amount", _set("amount.amount_minor", 0), "transaction.amount.amount_minor"),
    ("negative amount", _set("amount.amount_minor", -5), "transaction.amount.amount_minor"),
    ("huge amount", _set("amount.amount_minor", 10**15 + 1), "transaction.amount.amount_minor"),
    ("lower-case currency", _set("amount.currency", "cny"), "transaction.amount.currency"),
    ("unknown currency", _set("amount.currency", "XYZ"), "transaction.amount.currency"),
    ("withdrawn currency", _set("amount.currency", "HRK"), "transaction.amount.currency"),
    ("gold is not money", _set("amount.currency", "XAU"), "transaction.amount.currency"),
    ("no currency", _set("amount.currency", ""), "transaction.amount.currency"),
    ("no merchant", _set("merchant_id", ""), "transaction.merchant_id"),
    ("long merchant", _set("merchant_id", "m" * 65), "transaction.merchant_id"),
    ("long terminal", _set("terminal_id", "t" * 65), "transaction.terminal_id"),
    ("short mcc", _set("mcc", "541"), "transaction.mcc"),
    ("letter mcc", _set("mcc", "54a1"), "transaction.mcc"),
    ("non-ascii digit mcc", _set("mcc", "٥٤١١"), "transaction.mcc"),
    ("no event time", _clear("event_time"), "transaction.event_time"),
    (
        "event time before 2000",
        _set("event_time", stamp(datetime(1999, 12, 31, tzinfo=UTC))),
        "transaction.event_time",
    ),
    ("event time in the future", _future(10), "transaction.event_time"),
    ("event time out of range", _set("event_time", Timestamp(seconds=10**13)), "transaction.event_time"),
    (
        "event time bad nanos",
        _set("event_time", Timestamp(seconds=10**9, nanos=-1)),
        "transaction.event_time",
    ),
    ("unknown channel", _set("channel", 42), "transaction.channel"),
    ("latitude too big", _set("location.latitude", 90.5), "transaction.location.latitude"),
    ("latitude too small", _set("location.latitude", -91.0), "transaction.location.latitude"),
    ("latitude nan", _set("location.latitude", math.nan), "transaction.location.latitude"),
    ("longitude too big", _set("location.longitude", 180.5), "transaction.location.longitude"),
    ("longitude infinite", _set("location.longitude", -math.inf), "transaction.location.longitude"),
]


def good_request(number: str) -> R.ScoreTransactionRequest:
    return R.ScoreTransactionRequest(
        request_id="rq-" + uuid.uuid4().hex, transaction=txn(customer_number=number)
    )


@pytest.mark.parametrize(("mutate", "field"), [c[1:] for c in SCORE_CASES], ids=[c[0] for c in SCORE_CASES])
def test_score_bad_input_is_invalid_argument_and_changes_nothing(
    server: RunningServer, mutate: Mutate, field: str
) -> None:
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        number = issue(client).primary.number
        request = good_request(number)
        mutate(request)
        before = snapshot(server)
        with pytest.raises(posguard.InvalidArgumentError) as caught:
            client.score_transaction(request)
        assert caught.value.reason == "INVALID_ARGUMENT"
        assert field in [v.field for v in caught.value.field_violations]
        assert snapshot(server) == before


def test_every_bad_field_is_named_at_once(server: RunningServer) -> None:
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        request = R.ScoreTransactionRequest(
            transaction=R.Transaction(
                transaction_id="",
                customer_number="12",
                amount=Money(amount_minor=0, currency="usd"),
                mcc="1",
                channel=cast("common_pb2.Channel.ValueType", 9),
                location=common_pb2.Location(latitude=100, longitude=200),
            )
        )
        with pytest.raises(posguard.InvalidArgumentError) as caught:
            client.score_transaction(request)
        assert {v.field for v in caught.value.field_violations} == {
            "transaction.transaction_id",
            "transaction.customer_number",
            "transaction.amount.amount_minor",
            "transaction.amount.currency",
            "transaction.merchant_id",
            "transaction.mcc",
            "transaction.event_time",
            "transaction.channel",
            "transaction.location.latitude",
            "transaction.location.longitude",
        }


def test_edges_that_are_valid(server: RunningServer) -> None:
    """The largest amount, the poles and the antimeridian, no location, no terminal or MCC, MOBILE."""
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        customer = issue(client)
        number = customer.primary.number
        answers = [
            score(client, txn(customer_number=number, amount=Money(amount_minor=10**15, currency="JPY"))),
            score(
                client, txn(customer_number=number, location=common_pb2.Location(latitude=90, longitude=-180))
            ),
            score(
                client, txn(customer_number=number, location=common_pb2.Location(latitude=-90, longitude=180))
            ),
            score(client, txn(customer_number=number, location=None, terminal_id="", mcc="")),
            score(client, txn(customer_number=number, channel=common_pb2.CHANNEL_MOBILE)),
            score(client, txn(customer_number=number, channel=common_pb2.CHANNEL_UNSPECIFIED)),
            score(client, txn(customer_number=number, event_time=stamp(datetime(2000, 1, 1, tzinfo=UTC)))),
            score(client, txn(customer_number=number, amount=Money(amount_minor=1, currency="KWD"))),
        ]
        for answer in answers:
            assert_scored(answer, customer.customer_id)
        # A number in any human formatting is the same number.
        spaced = " ".join(number[i : i + 4] for i in range(0, len(number), 4))
        assert_scored(score(client, txn(customer_number=spaced)), customer.customer_id)


# -- ScoreTransaction: resolution, idempotency, rule declines -----------------------------------------


def test_score_by_number_then_replay_changes_nothing(running: RunningServer) -> None:
    with posguard.Client(running.target, api_key=running.key("gateway")) as client:
        customer = issue(client)
        transaction = txn(customer_number=customer.primary.number)
        first = score(client, transaction, request_id="score-1")
        assert_scored(first, customer.customer_id)
        assert first.transaction_id == transaction.transaction_id
        assert not first.replayed
        seen = profile(client, customer.customer_id)
        assert seen.transaction_count == 1
        before = snapshot(running)

        # The same request_id, another request_id, and the default key (the transaction id) all replay.
        for request_id in ("score-1", "score-1-retry", ""):
            again = client.score_transaction(
                R.ScoreTransactionRequest(request_id=request_id, transaction=transaction)
            )
            assert again.replayed
            expected = R.ScoreTransactionResponse()
            expected.CopyFrom(first)
            expected.replayed = True
            assert again == expected
        assert snapshot(running) == before
        assert profile(client, customer.customer_id) == seen


def test_a_reused_transaction_id_or_request_id_is_an_idempotency_conflict(running: RunningServer) -> None:
    with posguard.Client(running.target, api_key=running.key("gateway")) as client:
        customer = issue(client)
        transaction = txn(customer_number=customer.primary.number)
        score(client, transaction, request_id="conflict-1")
        before = snapshot(running)

        changed = R.Transaction()
        changed.CopyFrom(transaction)
        changed.amount.amount_minor += 1
        with pytest.raises(posguard.InvalidArgumentError) as caught:
            score(client, changed)
        assert caught.value.reason == "IDEMPOTENCY_CONFLICT"
        assert [v.field for v in caught.value.field_violations] == ["transaction.transaction_id"]

        with pytest.raises(posguard.InvalidArgumentError) as caught:
            score(client, txn(customer_number=customer.primary.number), request_id="conflict-1")
        assert caught.value.reason == "IDEMPOTENCY_CONFLICT"
        assert [v.field for v in caught.value.field_violations] == ["request_id"]
        assert snapshot(running) == before
        assert profile(client, customer.customer_id).transaction_count == 1


def test_score_by_external_id(running: RunningServer) -> None:
    with posguard.Client(running.target, api_key=running.key("gateway")) as client:
        customer = issue(client, external_ids=[EXT(namespace="wallet", value="W-42")])
        answer = score(client, txn(external_id=EXT(namespace="wallet", value="W-42")))
        assert_scored(answer, customer.customer_id)
        before = snapshot(running)
        with pytest.raises(posguard.NotFoundError):
            score(client, txn(external_id=EXT(namespace="wallet", value="w-42")))  # case-sensitive
        assert snapshot(running) == before


def test_a_number_never_issued_is_not_found(running: RunningServer) -> None:
    with posguard.Client(running.target, api_key=running.key("gateway")) as client:
        number = issue(client).primary.number
        # Another serial with valid check digits: well formed, but nobody has it.
        body = number[:10] + str((int(number[10:18]) + 1) % 10**8).zfill(8)
        forged = body + compute(body)
        before = snapshot(running)
        with pytest.raises(posguard.NotFoundError) as caught:
            score(client, txn(customer_number=forged))
        assert caught.value.reason == "NUMBER_NOT_FOUND"
        assert snapshot(running) == before


@pytest.mark.parametrize(
    ("action", "code"),
    [
        ("suspend_customer_id", "NUMBER_SUSPENDED"),
        ("revoke_customer_id", "NUMBER_REVOKED"),
        ("rotate_customer_id", "NUMBER_ROTATED"),
    ],
)
def test_a_blocked_number_declines_by_rule_and_is_stored(
    running: RunningServer, action: str, code: str
) -> None:
    with (
        posguard.Client(running.target, api_key=running.key("gateway")) as client,
        posguard.Client(running.target, api_key=running.key("admin")) as admin,
    ):
        customer = issue(client)
        number = customer.primary.number
        getattr(admin, action)(number=number, reason="test")
        transaction = txn(customer_number=number)
        before = count(running, SqlRiskTransaction)
        answer = score(client, transaction)
        assert_rule_decline(answer, code, customer.customer_id)
        assert answer.model.version == ""
        if code == "NUMBER_ROTATED":
            assert "successor" in answer.reasons[0].message
        assert count(running, SqlRiskTransaction) == before + 1
        again = score(client, transaction)
        assert again.replayed
        assert again.reasons == answer.reasons
        assert profile(client, customer.customer_id).declines == 1


def test_sub_numbers_decline_outside_their_scope_or_with_a_blocked_primary(running: RunningServer) -> None:
    with (
        posguard.Client(running.target, api_key=running.key("gateway")) as client,
        posguard.Client(running.target, api_key=running.key("admin")) as admin,
    ):
        customer = issue(client)
        sub = client.issue_sub_id(
            primary_number=customer.primary.number,
            scope=customer_ids_pb2.SubScope(merchant_id="m-1", channel=common_pb2.CHANNEL_POS),
        ).sub_number.number
        assert_scored(score(client, txn(customer_number=sub)), customer.customer_id)
        assert_rule_decline(
            score(client, txn(customer_number=sub, merchant_id="m-2")),
            "NUMBER_OUT_OF_SCOPE",
            customer.customer_id,
        )
        assert_rule_decline(
            score(client, txn(customer_number=sub, channel=common_pb2.CHANNEL_ONLINE)),
            "NUMBER_OUT_OF_SCOPE",
            customer.customer_id,
        )
        admin.suspend_customer_id(number=customer.primary.number, reason="card lost")
        assert_rule_decline(score(client, txn(customer_number=sub)), "NUMBER_SUSPENDED", customer.customer_id)


@pytest.mark.usefixtures("not_at_a_step_edge")
def test_score_by_dynamic_code_redeems_it_once(running: RunningServer) -> None:
    with posguard.Client(running.target, api_key=running.key("gateway")) as client:
        customer = issue(client)
        secret = client.enroll_dynamic_codes(number=customer.primary.number).secret
        code = posguard.dynamic_code(secret)
        first_txn = txn(dynamic_code=f"{code[:6]} {code[6:12]}-{code[12:]}")
        first = score(client, first_txn)
        assert_scored(first, customer.customer_id)
        assert count(running, SqlDynamicCodeUse) == 1

        # A retry of the same transaction replays its answer; it is not a second use of the code.
        again = score(client, first_txn)
        assert again.replayed
        assert (again.decision, again.reasons) == (first.decision, first.reasons)

        # Another transaction with the same code is a replay of the code: declined by rule, and stored.
        replayed = score(client, txn(dynamic_code=code))
        assert_rule_decline(replayed, "DYNAMIC_CODE_REPLAYED", customer.customer_id)
        seen = profile(client, customer.customer_id)
        assert seen.dynamic_code_replays == 1
        assert seen.declines == 1
        assert count(running, SqlDynamicCodeUse) == 1

        # The same transaction id with another code is a conflict, and does not use that code up.
        fresh = posguard.dynamic_code(secret, at=time.time() + PERIOD_SECONDS)
        changed = R.Transaction()
        changed.CopyFrom(first_txn)
        changed.dynamic_code = fresh
        with pytest.raises(posguard.InvalidArgumentError) as caught:
            score(client, changed)
        assert caught.value.reason == "IDEMPOTENCY_CONFLICT"
        assert [v.field for v in caught.value.field_violations] == ["transaction.transaction_id"]
        assert_scored(score(client, txn(dynamic_code=fresh)), customer.customer_id)


@pytest.mark.usefixtures("not_at_a_step_edge")
def test_expired_and_unknown_dynamic_codes(running: RunningServer) -> None:
    with (
        posguard.Client(running.target, api_key=running.key("gateway")) as client,
        posguard.Client(running.target, api_key=running.key("admin")) as admin,
    ):
        customer = issue(client)
        secret = client.enroll_dynamic_codes(number=customer.primary.number).secret
        expired = posguard.dynamic_code(secret, at=time.time() - 3 * PERIOD_SECONDS)
        assert_rule_decline(
            score(client, txn(dynamic_code=expired)), "DYNAMIC_CODE_EXPIRED", customer.customer_id
        )

        handle = secret.split(".")[1]
        unknown = str((int(handle) + 1) % 10**10).zfill(10) + "12345678"
        transactions = count(running, SqlRiskTransaction)
        with pytest.raises(posguard.NotFoundError) as caught:
            score(client, txn(dynamic_code=unknown))
        assert caught.value.reason == "DYNAMIC_CODE_NOT_FOUND"
        assert count(running, SqlRiskTransaction) == transactions

        admin.suspend_customer_id(number=customer.primary.number, reason="card lost")
        blocked = score(client, txn(dynamic_code=posguard.dynamic_code(secret)))
        assert_rule_decline(blocked, "NUMBER_SUSPENDED", customer.customer_id)


def test_a_trainer_key_cannot_score_but_reads_profiles(server: RunningServer) -> None:
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        customer = issue(client)
    with posguard.Client(server.target, api_key=server.key("trainer")) as trainer:
        with pytest.raises(posguard.PermissionDeniedError):
            score(trainer, txn(customer_number=customer.primary.number))
        with pytest.raises(posguard.PermissionDeniedError):
            list(trainer.score_transactions([R.ScoreTransactionsRequest(transaction=txn())]))
        assert profile(trainer, customer.customer_id).transaction_count == 0


# -- ScoreTransactions --------------------------------------------------------------------------------


def test_stream_answers_every_item_in_order_and_goes_on_after_a_bad_one(running: RunningServer) -> None:
    with posguard.Client(running.target, api_key=running.key("gateway")) as client:
        customer = issue(client)
        number = customer.primary.number
        requests = [
            R.ScoreTransactionsRequest(transaction=txn(customer_number=number)),
            R.ScoreTransactionsRequest(transaction=txn(customer_number=number)),
            R.ScoreTransactionsRequest(transaction=txn(customer_number=number, mcc="12")),
            R.ScoreTransactionsRequest(transaction=txn(customer_number=wrong_check_digits(number))),
            R.ScoreTransactionsRequest(transaction=txn(external_id=EXT(namespace="bank", value="nobody"))),
            R.ScoreTransactionsRequest(transaction=txn(customer_number=number)),
        ]
        replies = list(client.score_transactions(requests))
        assert [r.index for r in replies] == list(range(len(requests)))
        assert [r.transaction_id for r in replies] == [r.transaction.transaction_id for r in requests]
        assert [r.WhichOneof("outcome") for r in replies] == [
            "result",
            "result",
            "error",
            "error",
            "error",
            "result",
        ]
        for reply in (replies[0], replies[1], replies[5]):
            assert_scored(reply.result, customer.customer_id)
        bad_mcc, bad_number, unknown = replies[2].error, replies[3].error, replies[4].error
        assert (bad_mcc.code, bad_mcc.reason) == ("INVALID_ARGUMENT", "INVALID_ARGUMENT")
        assert [v.field for v in bad_mcc.field_violations] == ["transaction.mcc"]
        assert [v.field for v in bad_number.field_violations] == ["transaction.customer_number"]
        assert (unknown.code, unknown.reason, list(unknown.field_violations)) == (
            "NOT_FOUND",
            "CUSTOMER_NOT_FOUND",
            [],
        )
        assert profile(client, customer.customer_id).transaction_count == 3

        # The same stream again replays every scored item and changes nothing.
        before = snapshot(running)
        again = list(client.score_transactions(requests))
        assert [r.result.replayed for r in again if r.HasField("result")] == [True, True, True]
        assert [r.result.risk_score for r in again if r.HasField("result")] == [
            r.result.risk_score for r in replies if r.HasField("result")
        ]
        assert snapshot(running) == before


def test_a_fast_stream_is_scored_in_batches_exactly_as_one_by_one(running: RunningServer) -> None:
    """Hundreds of items sent at once: each sees every earlier item of its customer, retries replay."""
    with posguard.Client(running.target, api_key=running.key("gateway")) as client:
        customers = [issue(client) for _ in range(3)]
        requests = []
        expected: list[tuple[str, int, bool]] = []  # (customer, history size, replayed)
        seen = [0, 0, 0]
        start = datetime.now(UTC) - timedelta(days=1)
        for i in range(240):
            who = i % 3
            when = stamp(start + timedelta(minutes=i))
            request = R.ScoreTransactionsRequest(
                transaction=txn(customer_number=customers[who].primary.number, event_time=when)
            )
            requests.append(request)
            expected.append((customers[who].customer_id, seen[who], False))
            seen[who] += 1
            if i % 50 == 7:  # a retry straight after the original replays it
                requests.append(request)
                expected.append((customers[who].customer_id, seen[who] - 1, True))
        clash = R.ScoreTransactionsRequest()
        clash.CopyFrom(requests[10])
        clash.transaction.amount.amount_minor += 1  # the id of another transaction
        requests.append(clash)

        replies = list(client.score_transactions(requests))

        assert [r.index for r in replies] == list(range(len(requests)))
        assert [r.error for r in replies[:-1] if r.HasField("error")] == []
        assert [
            (r.result.customer_id, r.result.model.history_size, r.result.replayed) for r in replies[:-1]
        ] == expected
        assert replies[-1].error.reason == "IDEMPOTENCY_CONFLICT"
        for customer, n in zip(customers, seen, strict=True):
            assert profile(client, customer.customer_id).transaction_count == n


@pytest.mark.usefixtures("not_at_a_step_edge")
def test_stream_redeems_dynamic_codes_and_declines_their_replay(running: RunningServer) -> None:
    with posguard.Client(running.target, api_key=running.key("gateway")) as client:
        customer = issue(client)
        code = posguard.dynamic_code(client.enroll_dynamic_codes(number=customer.primary.number).secret)
        requests = [R.ScoreTransactionsRequest(transaction=txn(dynamic_code=code)) for _ in range(2)]
        first, second = client.score_transactions(requests)
        assert_scored(first.result, customer.customer_id)
        assert_rule_decline(second.result, "DYNAMIC_CODE_REPLAYED", customer.customer_id)


def test_concurrent_retries_of_one_transaction_store_it_once(running: RunningServer) -> None:
    with posguard.Client(running.target, api_key=running.key("gateway")) as client:
        customer = issue(client)
        transaction = txn(customer_number=customer.primary.number)
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda _: score(client, transaction), range(8)))
        assert sorted(a.replayed for a in answers) == [False] + [True] * 7
        assert len({a.SerializeToString(deterministic=True) for a in answers if a.replayed}) == 1
        assert count(running, SqlRiskTransaction) == 1
        assert profile(client, customer.customer_id).transaction_count == 1


def test_concurrent_calls_share_commits_and_lose_nothing(running: RunningServer) -> None:
    with posguard.Client(running.target, api_key=running.key("gateway")) as client:
        customers = [issue(client) for _ in range(4)]
        start = datetime.now(UTC) - timedelta(hours=12)
        transactions = [
            txn(
                customer_number=customers[i % 4].primary.number,
                event_time=stamp(start + timedelta(seconds=i)),
            )
            for i in range(48)
        ]
        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(lambda t: score(client, t), transactions))
        assert [a.transaction_id for a in answers] == [t.transaction_id for t in transactions]
        assert not any(a.replayed for a in answers)
        assert count(running, SqlRiskTransaction) == 48
        for customer in customers:
            assert profile(client, customer.customer_id).transaction_count == 12


def test_stream_reports_every_bad_input_as_an_item_error(server: RunningServer) -> None:
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        number = issue(client).primary.number
        requests = []
        for _, mutate, _ in SCORE_CASES:
            request = good_request(number)
            mutate(request)
            # The two request messages have the same fields: the wire form keeps an unset transaction unset.
            requests.append(R.ScoreTransactionsRequest.FromString(request.SerializeToString()))
        before = snapshot(server)
        replies = list(client.score_transactions(requests))
        assert len(replies) == len(SCORE_CASES)
        for reply, (name, _, field) in zip(replies, SCORE_CASES, strict=True):
            assert reply.WhichOneof("outcome") == "error", name
            assert reply.error.code == "INVALID_ARGUMENT", name
            assert field in [v.field for v in reply.error.field_violations], name
        assert snapshot(server) == before
        # An empty stream is a stream too.
        assert list(client.score_transactions([])) == []


# -- ReportOutcome ------------------------------------------------------------------------------------


def test_report_outcome_is_idempotent_and_a_later_report_replaces_the_label(running: RunningServer) -> None:
    with (
        posguard.Client(running.target, api_key=running.key("gateway")) as client,
        posguard.Client(running.target, api_key=running.key("admin")) as admin,
    ):
        customer = issue(client)
        scored = score(client, txn(customer_number=customer.primary.number))
        first = client.report_outcome(
            request_id="label-1",
            transaction_id=scored.transaction_id,
            outcome=R.OUTCOME_CHARGEBACK,
            note="case 7",
        )
        assert (first.transaction_id, first.outcome, first.replayed) == (
            scored.transaction_id,
            R.OUTCOME_CHARGEBACK,
            False,
        )
        before = snapshot(running)
        again = client.report_outcome(
            request_id="label-1",
            transaction_id=scored.transaction_id,
            outcome=R.OUTCOME_CHARGEBACK,
            note="case 7",
        )
        assert (again.outcome, again.replayed) == (R.OUTCOME_CHARGEBACK, True)
        assert snapshot(running) == before
        with pytest.raises(posguard.InvalidArgumentError) as caught:
            client.report_outcome(
                request_id="label-1", transaction_id=scored.transaction_id, outcome=R.OUTCOME_FRAUD
            )
        assert caught.value.reason == "IDEMPOTENCY_CONFLICT"
        assert [v.field for v in caught.value.field_violations] == ["request_id"]

        later = admin.report_outcome(
            request_id="label-2",
            transaction_id=scored.transaction_id,
            outcome=R.OUTCOME_LEGITIMATE,
            reported_at=stamp(datetime.now(UTC) - timedelta(minutes=1)),
            note="customer confirmed\nby phone",
        )
        assert (later.outcome, later.replayed) == (R.OUTCOME_LEGITIMATE, False)
        with running.server.database.session(read_only=True) as session:
            stored = session.scalar(
                select(SqlRiskTransaction.outcome).where(
                    SqlRiskTransaction.transaction_id == scored.transaction_id
                )
            )
        assert stored == "LEGITIMATE"


def test_report_outcome_for_an_unknown_transaction_is_not_found(running: RunningServer) -> None:
    with posguard.Client(running.target, api_key=running.key("gateway")) as client:
        before = snapshot(running)
        with pytest.raises(posguard.NotFoundError):
            client.report_outcome(transaction_id="never-scored", outcome=R.OUTCOME_FRAUD)
        assert snapshot(running) == before


OUTCOME_CASES: list[tuple[dict[str, Any], str]] = [
    ({"request_id": ""}, "request_id"),
    ({"request_id": "r" * 129}, "request_id"),
    ({"transaction_id": ""}, "transaction_id"),
    ({"transaction_id": "t" * 129}, "transaction_id"),
    ({"outcome": R.OUTCOME_UNSPECIFIED}, "outcome"),
    ({"outcome": 17}, "outcome"),
    ({"reported_at": Timestamp(seconds=10**13)}, "reported_at"),
    ({"reported_at": stamp(datetime(1999, 1, 1, tzinfo=UTC))}, "reported_at"),
    ({"reported_at": stamp(datetime.now(UTC) + timedelta(days=1))}, "reported_at"),
    ({"note": "n" * 1001}, "note"),
    ({"note": "bell\x07"}, "note"),
]


@pytest.mark.parametrize(("fields", "field"), OUTCOME_CASES, ids=[f for _, f in OUTCOME_CASES])
def test_report_outcome_bad_input_is_invalid_argument_and_changes_nothing(
    server: RunningServer, fields: dict[str, Any], field: str
) -> None:
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        scored = score(client, txn(customer_number=issue(client).primary.number))
    request = R.ReportOutcomeRequest(
        request_id="label-" + uuid.uuid4().hex, transaction_id=scored.transaction_id, outcome=R.OUTCOME_FRAUD
    )
    for name, value in fields.items():
        if isinstance(value, Timestamp):
            getattr(request, name).CopyFrom(value)
        else:
            setattr(request, name, value)
    before = snapshot(server)
    with pytest.raises(posguard.InvalidArgumentError) as caught:
        raw_call(server, "gateway", "ReportOutcome", request)
    assert caught.value.reason == "INVALID_ARGUMENT"
    assert [v.field for v in caught.value.field_violations] == [field]
    assert snapshot(server) == before


# -- GetCustomerRiskProfile ---------------------------------------------------------------------------


def test_profile_by_any_selector_counts_the_history(running: RunningServer) -> None:
    with posguard.Client(running.target, api_key=running.key("gateway")) as client:
        customer = issue(client, external_ids=[EXT(namespace="bank", value="acct-9")])
        empty = profile(client, customer.customer_id)
        assert (empty.customer_id, empty.transaction_count, empty.declines, empty.reviews) == (
            customer.customer_id,
            0,
            0,
            0,
        )
        assert not empty.HasField("typical_amount")
        assert not empty.HasField("first_seen")
        assert empty.active_model.scope in (R.MODEL_SCOPE_GLOBAL, R.MODEL_SCOPE_NONE, R.MODEL_SCOPE_CUSTOMER)

        first, last = next_time(), None
        score(client, txn(customer_number=customer.primary.number, event_time=first, merchant_id="m-a"))
        for amount in (900, 1000):
            last = next_time()
            score(
                client,
                txn(
                    customer_number=customer.primary.number,
                    event_time=last,
                    merchant_id="m-b",
                    terminal_id="t-9",
                    amount=Money(amount_minor=amount, currency="CNY"),
                ),
            )
        by_id = profile(client, customer.customer_id)
        assert by_id.transaction_count == 3
        assert by_id.first_seen == first
        assert by_id.last_seen == last
        assert by_id.typical_amount.currency == "CNY"
        assert by_id.typical_amount.amount_minor > 0
        assert (by_id.distinct_merchants, by_id.distinct_terminals) == (2, 2)
        spaced = " ".join(customer.primary.number[i : i + 4] for i in range(0, 20, 4))
        assert client.get_customer_risk_profile(customer=Selector(number=spaced)) == by_id
        external = client.get_customer_risk_profile(
            customer=Selector(external_id=EXT(namespace="bank", value="acct-9"))
        )
        assert external == by_id


def test_a_profile_stored_by_an_earlier_version_scores_alike_and_is_rewritten(running: RunningServer) -> None:
    with posguard.Client(running.target, api_key=running.key("gateway")) as client:
        old, new = issue(client), issue(client)
        times = [next_time() for _ in range(4)]
        amounts = (12_50, 9_00, 40_00, 75_00)
        for customer in (old, new):
            for when, amount in zip(times[:3], amounts[:3], strict=True):
                score(
                    client,
                    txn(
                        customer_number=customer.primary.number,
                        event_time=when,
                        amount=Money(amount_minor=amount, currency="CNY"),
                    ),
                )
        # What releases before the binary format stored: the same state as JSON (format 1).
        with running.server.database.session() as session:
            row = session.get(SqlRiskProfile, old.customer_id)
            assert row is not None
            state = Profile.from_bytes(row.state)
            row.state = json.dumps(
                {
                    "format": 1,
                    "count": state.count,
                    "first_time": state.first_time,
                    "last_time": state.last_time,
                    "sum_log_amount": state.sum_log_amount,
                    "total_spend": state.total_spend,
                    "recent": state.recent,
                }
            ).encode()
        answers = [
            score(
                client,
                txn(
                    customer_number=customer.primary.number,
                    event_time=times[3],
                    amount=Money(amount_minor=amounts[3], currency="CNY"),
                ),
            )
            for customer in (old, new)
        ]
    assert answers[0].risk_score == answers[1].risk_score
    assert answers[0].model.history_size == answers[1].model.history_size == 3
    with running.server.database.session(read_only=True) as session:
        features = [
            session.scalars(
                select(SqlRiskTransaction.features)
                .where(SqlRiskTransaction.customer_id == customer.customer_id)
                .order_by(SqlRiskTransaction.event_time.desc())
                .limit(1)
            ).one()
            for customer in (old, new)
        ]
        states = [session.get_one(SqlRiskProfile, c.customer_id).state for c in (old, new)]
    # Bit for bit: the core features come from what format 1 kept, and the habit features are quiet for both
    # customers here (one terminal, hours close together, no location).
    assert features[0] == features[1]
    assert states[0][0] == states[1][0] == 3  # rewritten in the current binary format
    rewritten, fresh = (Profile.from_bytes(state) for state in states)
    assert rewritten.count == fresh.count == 4
    assert (rewritten.sum_log_amount, rewritten.recent) == (fresh.sum_log_amount, fresh.recent)
    # What format 1 did not keep starts at the rewrite: one transaction's hour and place, not four.
    assert (sum(rewritten.hours), len(rewritten.places)) == (1, 1)
    assert sum(fresh.hours) == 4


PROFILE_CASES: list[tuple[common_pb2.CustomerSelector | None, str]] = [
    (None, "customer"),
    (Selector(number="12"), "customer.number"),
    (Selector(number=""), "customer.number"),
    (Selector(customer_id=""), "customer.customer_id"),
    (Selector(customer_id="c" * 33), "customer.customer_id"),
    (Selector(external_id=EXT(namespace="", value="v")), "customer.external_id.namespace"),
    (Selector(external_id=EXT(namespace="bank", value="")), "customer.external_id.value"),
]


@pytest.mark.parametrize(
    ("selector", "field"), PROFILE_CASES, ids=[f"{f}-{i}" for i, (_, f) in enumerate(PROFILE_CASES)]
)
def test_profile_bad_input_is_invalid_argument(
    server: RunningServer, selector: common_pb2.CustomerSelector | None, field: str
) -> None:
    request = R.GetCustomerRiskProfileRequest(customer=selector)
    server.key("gateway")  # made (and audited) before the snapshot
    before = snapshot(server)
    with pytest.raises(posguard.InvalidArgumentError) as caught:
        raw_call(server, "gateway", "GetCustomerRiskProfile", request)
    assert [v.field for v in caught.value.field_violations] == [field]
    assert snapshot(server) == before


def test_profile_of_nobody_is_not_found(running: RunningServer) -> None:
    with posguard.Client(running.target, api_key=running.key("admin")) as client:
        with pytest.raises(posguard.NotFoundError):
            client.get_customer_risk_profile(customer=Selector(customer_id="cus_000000000000000000000000"))
        with pytest.raises(posguard.NotFoundError):
            client.get_customer_risk_profile(customer=Selector(external_id=EXT(namespace="bank", value="x")))
