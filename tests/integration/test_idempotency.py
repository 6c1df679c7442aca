"""Idempotency keys on a real server, on SQLite and PostgreSQL: a request_id is its caller's own, every
mutating RPC records it, and a retry replays or is refused, never runs again.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import bindparam, func, select, text

import posguard
from posguard.errors import from_rpc_error
from posguard.v1 import admin_pb2, cases_pb2, common_pb2, customer_ids_pb2, risk_pb2
from posguard_server.domain.api_keys import Role, create_key
from posguard_server.domain.errors import FailedPrecondition
from posguard_server.domain.risk import ModelScope, NewModel
from posguard_server.store.api_keys import SqlApiKeyStore
from posguard_server.store.audit import SqlAuditEvent
from posguard_server.store.customers import SqlCustomerNumber, SqlExternalId
from posguard_server.store.db import Database
from posguard_server.store.dynamic_codes import Sealed, SqlDynamicCodeAttempt, SqlDynamicCodeStore
from posguard_server.store.idempotency import SqlIdempotencyKey
from posguard_server.store.migrate import upgrade
from posguard_server.store.model_registry import SqlModelRegistry
from posguard_server.store.risk_tables import SqlRiskOutcomeReport, SqlRiskTransaction
from posguard_server.store.schema import SqlApiKey, UTCDateTime

if TYPE_CHECKING:
    from .conftest import RunningServer

V, R, A, C = customer_ids_pb2, risk_pb2, admin_pb2, cases_pb2
CONFLICT = "IDEMPOTENCY_CONFLICT"


@pytest.fixture
def running(server_factory: Callable[..., RunningServer], database_url: str) -> RunningServer:
    """A server on each backend; a shared database is migrated first, as an operator would."""
    upgrade(database_url)
    return server_factory(database_url=database_url)


pytestmark = pytest.mark.usefixtures("not_at_a_step_edge")


# -- helpers ------------------------------------------------------------------------------------------


def new_token(server: RunningServer, role: Role, name: str) -> str:
    """A fresh API key of ``role``: each one is a caller of its own."""
    _, token = create_key(SqlApiKeyStore(server.server.database), name=name, role=role, created_by="test")
    assert token is not None
    return token


def client(server: RunningServer, token: str) -> posguard.Client:
    return posguard.Client(server.target, api_key=token)


def snapshot(server: RunningServer) -> tuple[int, ...]:
    """Everything a mutating call could have written."""
    models = (
        SqlAuditEvent,
        SqlRiskTransaction,
        SqlRiskOutcomeReport,
        SqlCustomerNumber,
        SqlExternalId,
        SqlApiKey,
        SqlDynamicCodeAttempt,
        SqlIdempotencyKey,
    )
    with server.server.database.session(read_only=True) as session:
        return tuple(int(session.scalar(select(func.count()).select_from(m)) or 0) for m in models)


def stamp(value: datetime) -> Timestamp:
    result = Timestamp()
    result.FromDatetime(value)
    return result


def transaction(number: str, transaction_id: str | None = None, minutes: int = 0) -> R.Transaction:
    return R.Transaction(
        transaction_id=transaction_id or "tx-" + uuid.uuid4().hex,
        customer_number=number,
        amount=common_pb2.Money(amount_minor=1250, currency="CNY"),
        merchant_id="m-1",
        terminal_id="t-1",
        mcc="5411",
        channel=common_pb2.CHANNEL_POS,
        event_time=stamp(datetime.now(UTC) - timedelta(hours=1) + timedelta(minutes=minutes)),
    )


def issue(admin: posguard.Client) -> V.Customer:
    customer: V.Customer = admin.issue_customer_id().customer
    return customer


def register_run(server: RunningServer, version: str, customers: tuple[str, ...]) -> None:
    now = datetime.now(UTC)
    SqlModelRegistry(server.server.database).add_models(
        [
            NewModel(
                scope=scope,
                customer_id=customer,
                version=version,
                created_at=now,
                training_window_start=now - timedelta(days=30),
                training_window_end=now,
                sample_count=250,
                metrics={},
                artifact=b"not a real model",
            )
            for scope, customer in [(ModelScope.GLOBAL, ""), *((ModelScope.CUSTOMER, c) for c in customers)]
        ]
    )


def answer_of(response: Message) -> Message:
    """What a retry must answer again: the response without the flag that tells a replay, or the one-time
    token that only the first answer carries."""
    copy = type(response)()
    copy.CopyFrom(response)
    for name in ("replayed", "token"):
        if name in copy.DESCRIPTOR.fields_by_name:
            copy.ClearField(name)
    return copy


# -- every mutating RPC, table-driven -----------------------------------------------------------------


Call = Callable[[posguard.Client, str, int], Message]  # (client, request_id, which body: 1 or 2) → answer


@dataclass(frozen=True)
class Case:
    role: Role
    # Prepares the server with its own admin key; returns how to call the RPC with body 1 or 2.
    setup: Callable[[RunningServer, posguard.Client], Call]


def _issue(server: RunningServer, admin: posguard.Client) -> Call:
    return lambda c, rid, body: c.issue_customer_id(request_id=rid, holder=V.Holder(name=f"holder {body}"))


def _transition(method: str, *, suspended: bool = False) -> Callable[[RunningServer, posguard.Client], Call]:
    def setup(server: RunningServer, admin: posguard.Client) -> Call:
        numbers = {1: issue(admin).primary.number, 2: issue(admin).primary.number}
        if suspended:
            for number in numbers.values():
                admin.suspend_customer_id(number=number, reason="setup")
        return lambda c, rid, body: getattr(c, method)(request_id=rid, number=numbers[body], reason="why")

    return setup


def _sub(server: RunningServer, admin: posguard.Client) -> Call:
    number = issue(admin).primary.number
    return lambda c, rid, body: c.issue_sub_id(request_id=rid, primary_number=number, label=f"card {body}")


def _link(server: RunningServer, admin: posguard.Client) -> Call:
    customer_id = issue(admin).customer_id
    return lambda c, rid, body: c.link_external_id(
        request_id=rid,
        customer=common_pb2.CustomerSelector(customer_id=customer_id),
        external_id=common_pb2.ExternalId(namespace="crm", value=f"v-{body}"),
    )


def _enroll(server: RunningServer, admin: posguard.Client) -> Call:
    numbers = {1: issue(admin).primary.number, 2: issue(admin).primary.number}
    return lambda c, rid, body: c.enroll_dynamic_codes(request_id=rid, number=numbers[body])


def _redeem(server: RunningServer, admin: posguard.Client) -> Call:
    secrets = {b: admin.enroll_dynamic_codes(number=issue(admin).primary.number).secret for b in (1, 2)}
    codes = {b: posguard.dynamic_code(secret) for b, secret in secrets.items()}
    return lambda c, rid, body: c.redeem_dynamic_code(request_id=rid, code=codes[body], merchant_id="m-1")


def _score(server: RunningServer, admin: posguard.Client) -> Call:
    number = issue(admin).primary.number
    txns = {b: transaction(number, minutes=b) for b in (1, 2)}
    return lambda c, rid, body: c.score_transaction(request_id=rid, transaction=txns[body])


def _outcome(server: RunningServer, admin: posguard.Client) -> Call:
    number = issue(admin).primary.number
    with client(server, server.key("gateway")) as gateway:
        ids = {
            b: gateway.score_transaction(transaction=transaction(number, minutes=b)).transaction_id
            for b in (1, 2)
        }
    return lambda c, rid, body: c.report_outcome(
        request_id=rid, transaction_id=ids[body], outcome=R.OUTCOME_FRAUD
    )


def _case_ids(server: RunningServer, admin: posguard.Client) -> dict[int, str]:
    """Two review cases: no model is trained, so each score is REVIEW and opens one."""
    number = issue(admin).primary.number
    with client(server, server.key("gateway")) as gateway:
        ids = {
            b: gateway.score_transaction(transaction=transaction(number, minutes=b)).transaction_id
            for b in (1, 2)
        }
    with client(server, server.key("analyst")) as analyst:
        cases = {c.transaction_id: c.case_id for c in analyst.list_cases().cases}
    return {b: cases[ids[b]] for b in (1, 2)}


def _assign_case(server: RunningServer, admin: posguard.Client) -> Call:
    cases = _case_ids(server, admin)
    return lambda c, rid, body: c.assign_case(request_id=rid, case_id=cases[body], assignee=f"analyst {body}")


def _resolve_case(server: RunningServer, admin: posguard.Client) -> Call:
    cases = _case_ids(server, admin)
    return lambda c, rid, body: c.resolve_case(
        request_id=rid, case_id=cases[body], resolution=C.CASE_RESOLUTION_FRAUD, note="confirmed"
    )


def _create_key(server: RunningServer, admin: posguard.Client) -> Call:
    return lambda c, rid, body: c.create_api_key(request_id=rid, name=f"till {body}", role=A.ROLE_GATEWAY)


def _revoke_key(server: RunningServer, admin: posguard.Client) -> Call:
    keys = {b: admin.create_api_key(name=f"old {b}", role=A.ROLE_GATEWAY).key.key_id for b in (1, 2)}
    return lambda c, rid, body: c.revoke_api_key(request_id=rid, key_id=keys[body], reason="replaced")


def _promote(server: RunningServer, admin: posguard.Client) -> Call:
    customers = {b: issue(admin).customer_id for b in (1, 2)}
    register_run(server, "r1", tuple(customers.values()))
    return lambda c, rid, body: c.promote_model(
        request_id=rid,
        scope=R.MODEL_SCOPE_CUSTOMER,
        customer_id=customers[body],
        version="r1",
        reason="better",
        force=True,
    )


def _rollback(server: RunningServer, admin: posguard.Client) -> Call:
    customers = {b: issue(admin).customer_id for b in (1, 2)}
    for version in ("r0", "r1"):  # r1 replaces r0: each customer's model has one to go back to
        register_run(server, version, tuple(customers.values()))
        admin.promote_model(scope=R.MODEL_SCOPE_GLOBAL, version=version, reason="run", force=True)
    return lambda c, rid, body: c.rollback_model(
        request_id=rid, scope=R.MODEL_SCOPE_CUSTOMER, customer_id=customers[body], reason="worse"
    )


CASES = {
    "IssueCustomerId": Case(Role.GATEWAY, _issue),
    "SuspendCustomerId": Case(Role.ADMIN, _transition("suspend_customer_id")),
    "ReactivateCustomerId": Case(Role.ADMIN, _transition("reactivate_customer_id", suspended=True)),
    "RevokeCustomerId": Case(Role.ADMIN, _transition("revoke_customer_id")),
    "RotateCustomerId": Case(Role.ADMIN, _transition("rotate_customer_id")),
    "IssueSubId": Case(Role.GATEWAY, _sub),
    "LinkExternalId": Case(Role.GATEWAY, _link),
    "EnrollDynamicCodes": Case(Role.GATEWAY, _enroll),
    "RedeemDynamicCode": Case(Role.GATEWAY, _redeem),
    "ScoreTransaction": Case(Role.GATEWAY, _score),
    "ReportOutcome": Case(Role.GATEWAY, _outcome),
    "CreateApiKey": Case(Role.ADMIN, _create_key),
    "RevokeApiKey": Case(Role.ADMIN, _revoke_key),
    "PromoteModel": Case(Role.TRAINER, _promote),
    "RollbackModel": Case(Role.TRAINER, _rollback),
    "AssignCase": Case(Role.ANALYST, _assign_case),
    "ResolveCase": Case(Role.ANALYST, _resolve_case),
}


@pytest.mark.parametrize("method", list(CASES))
def test_every_mutating_rpc_keeps_its_request_id_as_its_callers_own(
    running: RunningServer, method: str
) -> None:
    case = CASES[method]
    with client(running, running.key("admin")) as admin:
        call = case.setup(running, admin)
    first_caller = client(running, new_token(running, case.role, "first"))
    other_caller = client(running, new_token(running, case.role, "other"))
    with first_caller, other_caller:
        first = call(first_caller, "rid-1", 1)

        # A retry replays the first answer and writes nothing.
        before = snapshot(running)
        again = call(first_caller, "rid-1", 1)
        assert answer_of(again) == answer_of(first)
        if "replayed" in again.DESCRIPTOR.fields_by_name:
            assert again.replayed
        assert snapshot(running) == before

        # The same request_id for another request of the same caller is refused, and writes nothing.
        with pytest.raises(posguard.InvalidArgumentError) as caught:
            call(first_caller, "rid-1", 2)
        assert caught.value.reason == CONFLICT
        assert [v.field for v in caught.value.field_violations] == ["request_id"]
        assert snapshot(running) == before

        # Another caller's request under the same request_id is its own call: carried out, not refused...
        other = call(other_caller, "rid-1", 2)
        assert snapshot(running) != before
        # ...and recorded as that caller's: its retry replays.
        after = snapshot(running)
        assert answer_of(call(other_caller, "rid-1", 2)) == answer_of(other)
        assert snapshot(running) == after


# -- (a) another key cannot borrow an answer ---------------------------------------------------------


def test_another_key_resending_a_request_id_and_body_gets_its_own_customer(running: RunningServer) -> None:
    first = client(running, new_token(running, Role.GATEWAY, "till a"))
    other = client(running, new_token(running, Role.GATEWAY, "till b"))
    with first, other:
        request = V.IssueCustomerIdRequest(request_id="issue-1", holder=V.Holder(name="Ada"))
        mine = first.issue_customer_id(request)
        theirs = other.issue_customer_id(request)
        assert not theirs.replayed
        assert theirs.customer.customer_id != mine.customer.customer_id
        assert theirs.customer.primary.number != mine.customer.primary.number
        # Each caller's retry replays its own customer.
        assert first.issue_customer_id(request).customer.customer_id == mine.customer.customer_id
        assert other.issue_customer_id(request).customer.customer_id == theirs.customer.customer_id


def test_another_key_cannot_replay_a_redemption_it_did_not_make(running: RunningServer) -> None:
    with client(running, running.key("admin")) as admin:
        number = issue(admin).primary.number
        secret = admin.enroll_dynamic_codes(number=number).secret
    first = client(running, new_token(running, Role.GATEWAY, "till a"))
    other = client(running, new_token(running, Role.GATEWAY, "till b"))
    with first, other:
        request = V.RedeemDynamicCodeRequest(
            request_id="redeem-1", code=posguard.dynamic_code(secret), merchant_id="m-1"
        )
        paid = first.redeem_dynamic_code(request)
        assert paid.redeemed
        assert paid.number == number
        # The other till presenting the same code under the same request_id is judged: the code is spent,
        # and it learns nothing of the customer.
        refused = other.redeem_dynamic_code(request)
        assert not refused.redeemed
        assert refused.reason == V.REDEMPTION_REASON_ALREADY_USED
        assert (refused.customer_id, refused.number) == ("", "")
        assert first.redeem_dynamic_code(request) == paid


# -- (b) RevokeApiKey ------------------------------------------------------------------------------------


def test_revoke_api_key_replays_a_retry_and_refuses_another_request_under_its_id(
    running: RunningServer,
) -> None:
    with client(running, running.key("admin")) as admin:
        one = admin.create_api_key(name="till 1", role=A.ROLE_GATEWAY).key.key_id
        two = admin.create_api_key(name="till 2", role=A.ROLE_GATEWAY).key.key_id
        revoked = admin.revoke_api_key(request_id="revoke-1", key_id=one, reason="lost")
        assert revoked.key.revoked_at.seconds > 0
        before = snapshot(running)
        assert admin.revoke_api_key(request_id="revoke-1", key_id=one, reason="lost") == revoked
        assert snapshot(running) == before
        for changed in ({"key_id": two, "reason": "lost"}, {"key_id": one, "reason": "stolen"}):
            with pytest.raises(posguard.InvalidArgumentError) as caught:
                admin.revoke_api_key(request_id="revoke-1", **changed)
            assert caught.value.reason == CONFLICT
            assert [v.field for v in caught.value.field_violations] == ["request_id"]
        assert snapshot(running) == before
        listed = {k.key_id: k for k in admin.list_api_keys(include_revoked=True).keys}
        assert listed[two].revoked_at.seconds == 0
        assert listed[one].revoke_reason == "lost"


# -- (c) ScoreTransaction ----------------------------------------------------------------------------


def test_a_request_id_that_replayed_by_transaction_id_cannot_score_another_transaction(
    running: RunningServer,
) -> None:
    with client(running, running.key("admin")) as admin:
        number = issue(admin).primary.number
    with client(running, running.key("gateway")) as gateway:
        first = transaction(number, minutes=1)
        stored = gateway.score_transaction(request_id="score-a", transaction=first)
        # The gateway retries under a new request_id: the transaction id replays it...
        retry = gateway.score_transaction(request_id="score-b", transaction=first)
        assert retry.replayed
        assert answer_of(retry) == answer_of(stored)
        # ...and "score-b" now names that transaction: it cannot score another one.
        before = snapshot(running)
        with pytest.raises(posguard.InvalidArgumentError) as caught:
            gateway.score_transaction(request_id="score-b", transaction=transaction(number, minutes=2))
        assert caught.value.reason == CONFLICT
        assert [v.field for v in caught.value.field_violations] == ["request_id"]
        assert snapshot(running) == before
        assert gateway.score_transaction(request_id="score-b", transaction=first).replayed

        # The same holds inside one stream.
        requests = [
            R.ScoreTransactionsRequest(request_id="score-b", transaction=first),
            R.ScoreTransactionsRequest(request_id="score-b", transaction=transaction(number, minutes=3)),
        ]
        replies = list(gateway.score_transactions(iter(requests)))
        assert replies[0].result.replayed
        assert replies[1].error.reason == CONFLICT
        assert snapshot(running) == before


# -- (d) unknown fields -----------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _unknown_field(number: int, value: bytes) -> bytes:
    """A length-delimited field this server's contract does not have, as a newer client would send it."""
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _raw_call(server: RunningServer, token: str, method: str, payload: bytes, response: type[Message]) -> Any:
    with posguard.Client(server.target, api_key=token) as c:
        call = c.channel.unary_unary(
            method, request_serializer=lambda raw: raw, response_deserializer=response.FromString
        )
        try:
            return call(payload, timeout=10, metadata=[("authorization", f"Bearer {token}")])
        except Exception as error:  # grpc.RpcError
            raise from_rpc_error(error) from None  # type: ignore[arg-type]


def test_unknown_fields_do_not_change_the_fingerprint(running: RunningServer) -> None:
    token = running.key("gateway")
    issue_request = V.IssueCustomerIdRequest(request_id="newer-1", holder=V.Holder(name="Ada"))
    plain = issue_request.SerializeToString()
    method = "/posguard.v1.CustomerIds/IssueCustomerId"
    first = _raw_call(running, token, method, plain, V.IssueCustomerIdResponse)
    assert not first.replayed
    # The same request from a client on a newer contract, with fields this server does not know, at the top
    # and inside the holder: an honest retry, so it replays.
    holder = V.Holder(name="Ada").SerializeToString() + _unknown_field(99, b"nickname")
    newer = (
        V.IssueCustomerIdRequest(request_id="newer-1").SerializeToString()
        + _unknown_field(4, holder)  # field 4 is the holder
        + _unknown_field(1000, b"something new")
    )
    assert V.IssueCustomerIdRequest.FromString(newer) != issue_request  # the unknown fields are there
    again = _raw_call(running, token, method, newer, V.IssueCustomerIdResponse)
    assert again.replayed
    assert again.customer.customer_id == first.customer.customer_id
    # What the server does know still counts: another holder under the same request_id is a conflict.
    other = V.IssueCustomerIdRequest(request_id="newer-1", holder=V.Holder(name="Bob")).SerializeToString()
    with pytest.raises(posguard.InvalidArgumentError) as caught:
        _raw_call(running, token, method, other + _unknown_field(1000, b"x"), V.IssueCustomerIdResponse)
    assert caught.value.reason == CONFLICT

    # Scoring: an unknown field inside the transaction, retried under the same transaction id, replays.
    with client(running, running.key("admin")) as admin:
        number = issue(admin).primary.number
    txn = transaction(number)
    scored = _raw_call(
        running,
        token,
        "/posguard.v1.Risk/ScoreTransaction",
        R.ScoreTransactionRequest(request_id="s-1", transaction=txn).SerializeToString(),
        R.ScoreTransactionResponse,
    )
    newer_txn = txn.SerializeToString() + _unknown_field(500, b"wallet hint")
    retried = _raw_call(
        running,
        token,
        "/posguard.v1.Risk/ScoreTransaction",
        R.ScoreTransactionRequest(request_id="s-1").SerializeToString() + _unknown_field(2, newer_txn),
        R.ScoreTransactionResponse,
    )
    assert retried.replayed
    assert answer_of(retried) == answer_of(scored)


# -- (e) EnrollDynamicCodes after a replacement --------------------------------------------------------


def test_an_enrolment_retried_after_its_replacement_is_refused_and_issues_no_secret(
    running: RunningServer,
) -> None:
    with client(running, running.key("admin")) as admin:
        number = issue(admin).primary.number
    with client(running, running.key("gateway")) as gateway:
        first = gateway.enroll_dynamic_codes(request_id="enrol-1", number=number)
        # A retry while the enrolment is current shows the same secret again; nothing new is made.
        assert gateway.enroll_dynamic_codes(request_id="enrol-1", number=number).secret == first.secret
        current = gateway.enroll_dynamic_codes(request_id="enrol-2", number=number, replace_existing=True)
        assert current.secret != first.secret
        before = snapshot(running)
        # The first request again (a late retry): its secret no longer works, and a new one would break the
        # device holding the current one. Refused, and nothing is written.
        with pytest.raises(posguard.FailedPreconditionError) as caught:
            gateway.enroll_dynamic_codes(request_id="enrol-1", number=number)
        assert caught.value.reason == "ENROLLMENT_REPLACED"
        assert snapshot(running) == before
        # The device holding the current secret still pays.
        paid = gateway.redeem_dynamic_code(code=posguard.dynamic_code(current.secret), merchant_id="m-1")
        assert paid.redeemed
        # The current enrolment's own retry still replays it.
        again = gateway.enroll_dynamic_codes(request_id="enrol-2", number=number, replace_existing=True)
        assert again.secret == current.secret


def test_a_replacing_enrolment_retried_after_a_later_replacement_is_refused(running: RunningServer) -> None:
    with client(running, running.key("admin")) as admin:
        number = issue(admin).primary.number
    with client(running, running.key("gateway")) as gateway:
        gateway.enroll_dynamic_codes(request_id="e-1", number=number)
        gateway.enroll_dynamic_codes(request_id="e-2", number=number, replace_existing=True)
        latest = gateway.enroll_dynamic_codes(request_id="e-3", number=number, replace_existing=True)
        before = snapshot(running)
        with pytest.raises(posguard.FailedPreconditionError) as caught:
            gateway.enroll_dynamic_codes(request_id="e-2", number=number, replace_existing=True)
        assert caught.value.reason == "ENROLLMENT_REPLACED"
        assert snapshot(running) == before
        paid = gateway.redeem_dynamic_code(code=posguard.dynamic_code(latest.secret), merchant_id="m-1")
        assert paid.redeemed


# -- the upgrade keeps the callers on record ------------------------------------------------------------


@pytest.mark.empty_database
def test_upgrade_gives_existing_keys_the_caller_on_record(database_url: str) -> None:
    upgrade(database_url, "0008")
    database = Database(database_url)
    at = {"at": datetime(2026, 1, 1, tzinfo=UTC)}

    def run(sql: str, **values: Any) -> None:
        statement = text(sql).bindparams(bindparam("at", type_=UTCDateTime()))
        with database.engine.begin() as connection:
            connection.execute(statement, {**at, **values})

    try:
        run(
            "INSERT INTO customers (customer_id, issuer, created_at, updated_at, created_by) "
            "VALUES ('cus_1', 'test', :at, :at, 'key-a')"
        )
        run(
            "INSERT INTO dynamic_enrollments (customer_id, handle, secret_ciphertext, key_version, "
            "enrolled_at, enrolled_by, refusals, replays, request_id, request_fingerprint) "
            "VALUES ('cus_1', '1234567890', :secret, 1, :at, 'key-b', 0, 0, 'enrol-1', 'fe')",
            secret=b"sealed",
        )
        run(
            "INSERT INTO audit_events (sequence, occurred_at, actor, action, subject, details, "
            "previous_hash, hash) VALUES (1, :at, 'key-c', 'customer.suspended', 'x', '{}', :h, :h)",
            h="0" * 64,
        )
        for method, request_id in (("customer.suspended", "s-1"), ("external_id.linked", "l-1")):
            run(
                "INSERT INTO idempotency_keys (method, request_id, fingerprint, customer_id, created_at) "
                "VALUES (:method, :rid, 'fp', 'cus_1', :at)",
                method=method,
                rid=request_id,
            )
        upgrade(database_url)
        with database.engine.connect() as connection:
            keys = set(connection.execute(text("SELECT method, request_id, caller FROM idempotency_keys")))
        assert keys == {
            ("customer.suspended", "s-1", "key-c"),  # the actor of the call's audit event
            ("external_id.linked", "l-1", ""),  # no event on record: no caller matches
            ("dynamic_code.enrolled", "enrol-1", "key-b"),  # the current enrolment's, by its enroller
        }
        # The enroller's retry of the current enrolment replays it; another caller's is a call of its own.
        store = SqlDynamicCodeStore(database)

        def enroll(actor: str) -> tuple[object, bool]:
            return store.enroll(
                "cus_1",
                "number",
                lambda: Sealed("0987654321", b"new", 1),
                replace_existing=False,
                request_id="enrol-1",
                fingerprint="fe",
                actor=actor,
                now=datetime.now(UTC),
            )

        _, replayed = enroll("key-b")
        assert replayed
        with pytest.raises(FailedPrecondition) as caught:
            enroll("key-z")
        assert caught.value.reason == "ALREADY_ENROLLED"
    finally:
        database.dispose()
