"""No side doors for guessing: every RPC that names a customer counts a miss against the caller's limit.

A miss is a number, external id, customer id or dynamic code that names nobody. Each RPC below is sent
never-issued values until the key's limit; each miss is answered (NOT_FOUND, or the RPC's own "not valid")
and audited, the key is then refused on every RPC that names a customer, even for a customer that exists,
and another key is not. Concurrent misses of one key never get past the limit, at one server process or
two, and count even when their callers leave before the answer. Wrong codes against one enrolment are
limited over all keys together (the per-target limit), and misses across all keys that spike are reported.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select

import posguard
from posguard.v1 import common_pb2, customer_ids_pb2, customer_ids_pb2_grpc, risk_pb2, risk_pb2_grpc
from posguard_server.domain.api_keys import Role, create_key
from posguard_server.domain.check_digits import compute
from posguard_server.store.api_keys import SqlApiKeyStore
from posguard_server.store.audit import SqlAuditEvent
from posguard_server.store.migrate import upgrade

from .conftest import start_replicas

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Cli, RunningServer, ServeProcess

C = customer_ids_pb2
R = risk_pb2
LIMIT = 3


pytestmark = pytest.mark.usefixtures("not_at_a_step_edge")


@dataclass(frozen=True)
class Known:
    """What exists on the server: a customer with a number, an external id and a dynamic-code secret."""

    customer_id: str
    number: str
    external: common_pb2.ExternalId
    secret: str


@dataclass
class Stubs:
    customer_ids: customer_ids_pb2_grpc.CustomerIdsStub
    risk: risk_pb2_grpc.RiskStub
    metadata: tuple[tuple[str, str], ...]

    def call(self, request: Any) -> Any:
        rpc = _rpc_of(request)
        stub = self.risk if hasattr(self.risk, rpc) else self.customer_ids
        return getattr(stub, rpc)(request, metadata=self.metadata, timeout=10)


def _forged(number: str, serial: int) -> str:
    """A well-formed number with valid check digits that was never issued (same prefix, another serial)."""
    body = number[:10] + f"{90_000_000 + serial:08d}"
    return body + compute(body)


def _unknown_code(serial: int) -> str:
    return f"{9_000_000_000 + serial:010d}{serial:08d}"  # a handle nobody holds


def _txn(**customer: Any) -> R.Transaction:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC) - timedelta(minutes=1))
    return R.Transaction(
        transaction_id="tx-" + uuid.uuid4().hex,
        amount=common_pb2.Money(amount_minor=12_50, currency="CNY"),
        merchant_id="m-1",
        terminal_id="t-1",
        mcc="5411",
        channel=common_pb2.CHANNEL_POS,
        event_time=stamp,
        **customer,
    )


def _rid() -> str:
    return "r-" + uuid.uuid4().hex


def _number(known: Known, n: int) -> str:
    return _forged(known.number, n)


def _external(n: int) -> common_pb2.ExternalId:
    return common_pb2.ExternalId(namespace="crm", value=f"nobody-{n}-{uuid.uuid4().hex[:6]}")


def _selector(**field: Any) -> common_pb2.CustomerSelector:
    return common_pb2.CustomerSelector(**field)


def _transition(rpc: str) -> Callable[[Known, int], Any]:
    """The miss of a lifecycle RPC (Suspend, Reactivate, Revoke, Rotate): a never-issued number."""
    request_type = getattr(C, f"{rpc}Request")
    return lambda k, n: request_type(number=_number(k, n), reason="test", request_id=_rid())


@dataclass(frozen=True)
class Case:
    """An RPC and a request that names nobody (``miss``) or the known customer (``hit``)."""

    rpc: str
    miss: Callable[[Known, int], Any]
    hit: Callable[[Known], Any]
    role: Role = Role.GATEWAY
    audited_as: str = "lookup.missed"  # the audit action of one miss
    answered: Callable[[Any], bool] | None = None  # RPCs that answer a miss instead of NOT_FOUND


CASES = [
    Case(
        "GetCustomer",
        lambda k, n: C.GetCustomerRequest(customer=_selector(number=_number(k, n))),
        lambda k: C.GetCustomerRequest(customer=_selector(number=k.number)),
    ),
    Case(
        "GetCustomer",
        lambda k, n: C.GetCustomerRequest(customer=_selector(external_id=_external(n))),
        lambda k: C.GetCustomerRequest(customer=_selector(external_id=k.external)),
    ),
    Case(
        "GetCustomer",
        lambda k, n: C.GetCustomerRequest(customer=_selector(customer_id="cus_" + secrets.token_hex(12))),
        lambda k: C.GetCustomerRequest(customer=_selector(customer_id=k.customer_id)),
    ),
    Case(
        "ResolveExternalId",
        lambda k, n: C.ResolveExternalIdRequest(external_id=_external(n)),
        lambda k: C.ResolveExternalIdRequest(external_id=k.external),
    ),
    Case(
        "ResolveExternalId",
        lambda k, n: C.ResolveExternalIdRequest(number=_number(k, n)),
        lambda k: C.ResolveExternalIdRequest(number=k.number),
    ),
    Case(
        "GetCustomerRiskProfile",
        lambda k, n: R.GetCustomerRiskProfileRequest(customer=_selector(number=_number(k, n))),
        lambda k: R.GetCustomerRiskProfileRequest(customer=_selector(number=k.number)),
    ),
    Case(
        "GetCustomerRiskProfile",
        lambda k, n: R.GetCustomerRiskProfileRequest(customer=_selector(external_id=_external(n))),
        lambda k: R.GetCustomerRiskProfileRequest(customer=_selector(external_id=k.external)),
    ),
    Case(
        "ScoreTransaction",
        lambda k, n: R.ScoreTransactionRequest(transaction=_txn(customer_number=_number(k, n))),
        lambda k: R.ScoreTransactionRequest(transaction=_txn(customer_number=k.number)),
    ),
    Case(
        "ScoreTransaction",
        lambda k, n: R.ScoreTransactionRequest(transaction=_txn(external_id=_external(n))),
        lambda k: R.ScoreTransactionRequest(transaction=_txn(external_id=k.external)),
    ),
    Case(
        "ScoreTransaction",
        lambda k, n: R.ScoreTransactionRequest(transaction=_txn(dynamic_code=_unknown_code(n))),
        lambda k: R.ScoreTransactionRequest(transaction=_txn(customer_number=k.number)),
    ),
    Case(
        "IssueDynamicCode",
        lambda k, n: C.IssueDynamicCodeRequest(number=_number(k, n), request_id=_rid()),
        lambda k: C.IssueDynamicCodeRequest(number=k.number, request_id=_rid()),
    ),
    Case(
        "EnrollDynamicCodes",
        lambda k, n: C.EnrollDynamicCodesRequest(number=_number(k, n), request_id=_rid()),
        lambda k: C.IssueDynamicCodeRequest(number=k.number, request_id=_rid()),  # sent to IssueDynamicCode
    ),
    Case(
        "IssueSubId",
        lambda k, n: C.IssueSubIdRequest(primary_number=_number(k, n), request_id=_rid()),
        lambda k: C.IssueSubIdRequest(primary_number=k.number, request_id=_rid()),
    ),
    Case(
        "LinkExternalId",
        lambda k, n: C.LinkExternalIdRequest(
            customer=_selector(number=_number(k, n)), external_id=_external(n), request_id=_rid()
        ),
        lambda k: C.LinkExternalIdRequest(
            customer=_selector(number=k.number), external_id=_external(99), request_id=_rid()
        ),
    ),
    *(
        Case(
            rpc,
            _transition(rpc),
            lambda k: C.GetCustomerRequest(customer=_selector(number=k.number)),  # sent to GetCustomer
            role=Role.ADMIN,
        )
        for rpc in ("SuspendCustomerId", "ReactivateCustomerId", "RevokeCustomerId", "RotateCustomerId")
    ),
    Case(
        "VerifyCustomerId",
        lambda k, n: C.VerifyCustomerIdRequest(number=_number(k, n)),
        lambda k: C.VerifyCustomerIdRequest(number=k.number),
        audited_as="verification.failed",
        answered=lambda answer: not answer.valid,
    ),
    Case(
        "RedeemDynamicCode",
        lambda k, n: C.RedeemDynamicCodeRequest(code=_unknown_code(n), merchant_id="m-1", request_id=_rid()),
        lambda k: C.GetCustomerRequest(customer=_selector(number=k.number)),  # sent to GetCustomer
        audited_as="dynamic_code.refused",
        answered=lambda answer: not answer.redeemed,
    ),
]


def _rpc_of(request: Any) -> str:
    """The RPC a request goes to (a case's hit may go to another RPC that names the customer alike)."""
    return type(request).__name__.removesuffix("Request")


_PLACEHOLDER = Known("cus_0", "0" * 20, common_pb2.ExternalId(namespace="crm", value="x"), "s")


def _new_key(server: RunningServer, role: Role) -> tuple[str, str]:
    key, token = create_key(SqlApiKeyStore(server.server.database), name="guesser", role=role, created_by="t")
    assert token is not None
    return key.key_id, token


@pytest.fixture
def world(server_factory: Callable[..., RunningServer], database_url: str) -> tuple[RunningServer, Known]:
    upgrade(database_url)
    server = server_factory(database_url=database_url, failure_limit=LIMIT, guess_spike_limit=0)
    with posguard.Client(server.target, api_key=server.key("admin")) as admin:
        customer = admin.issue_customer_id(
            external_ids=[common_pb2.ExternalId(namespace="crm", value="known-1")]
        ).customer
        secret = admin.enroll_dynamic_codes(number=customer.primary.number).secret
    known = Known(
        customer.customer_id,
        customer.primary.number,
        common_pb2.ExternalId(namespace="crm", value="known-1"),
        secret,
    )
    return server, known


@contextmanager
def _stubs(server: RunningServer, token: str) -> Iterator[Stubs]:
    with grpc.insecure_channel(server.target) as channel:
        yield Stubs(
            customer_ids_pb2_grpc.CustomerIdsStub(channel),
            risk_pb2_grpc.RiskStub(channel),
            (("authorization", f"Bearer {token}"),),
        )


def _audited(server: RunningServer, actor: str) -> list[SqlAuditEvent]:
    with server.server.database.session(read_only=True) as session:
        return list(session.scalars(select(SqlAuditEvent).where(SqlAuditEvent.actor == actor)))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.rpc}-{type(c.miss(_PLACEHOLDER, 0)).__name__}")
def test_every_rpc_that_names_a_customer_counts_misses_and_refuses_past_the_limit(
    world: tuple[RunningServer, Known], case: Case
) -> None:
    server, known = world
    key_id, token = _new_key(server, case.role)
    _, other_token = _new_key(server, case.role)
    with _stubs(server, token) as stubs:
        for n in range(LIMIT):
            if case.answered is not None:
                assert case.answered(stubs.call(case.miss(known, n)))
                continue
            with pytest.raises(grpc.RpcError) as missed:
                stubs.call(case.miss(known, n))
            assert missed.value.code() == grpc.StatusCode.NOT_FOUND, missed.value.details()
        # Past the limit: the next call naming a customer is refused, even one that exists.
        for request in (case.miss(known, LIMIT), case.hit(known)):
            with pytest.raises(grpc.RpcError) as refused:
                stubs.call(request)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
            assert known.number not in (refused.value.details() or "")
    with _stubs(server, other_token) as stubs:  # another key is not refused
        stubs.call(case.hit(known))
    events = _audited(server, key_id)
    misses = [e for e in events if e.action == case.audited_as]
    assert len(misses) == LIMIT
    if case.audited_as == "lookup.missed":
        assert {json.loads(e.details)["method"] for e in misses} == {case.rpc}
    assert [e.action for e in events if e.action == "caller.refused"] == ["caller.refused"]
    assert known.number not in str([e.details for e in events])


def test_a_key_refused_for_verifying_is_refused_on_every_rpc_that_names_a_customer(
    world: tuple[RunningServer, Known],
) -> None:
    server, known = world
    _, token = _new_key(server, Role.GATEWAY)
    with _stubs(server, token) as stubs:
        for n in range(LIMIT):
            assert not stubs.call(C.VerifyCustomerIdRequest(number=_number(known, n))).valid
        for request in [
            C.GetCustomerRequest(customer=_selector(number=known.number)),
            C.ResolveExternalIdRequest(external_id=known.external),
            R.GetCustomerRiskProfileRequest(customer=_selector(number=known.number)),
            R.ScoreTransactionRequest(transaction=_txn(customer_number=known.number)),
            C.IssueDynamicCodeRequest(number=known.number, request_id=_rid()),
        ]:
            with pytest.raises(grpc.RpcError) as refused:
                stubs.call(request)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, _rpc_of(request)


def test_a_stream_counts_the_misses_of_its_items(world: tuple[RunningServer, Known]) -> None:
    server, known = world
    key_id, token = _new_key(server, Role.GATEWAY)
    requests = [
        R.ScoreTransactionsRequest(transaction=_txn(customer_number=_number(known, n)))
        for n in range(LIMIT + 2)
    ]
    with _stubs(server, token) as stubs:
        replies = list(stubs.risk.ScoreTransactions(iter(requests), metadata=stubs.metadata, timeout=30))
    codes = [reply.error.code for reply in replies]
    assert codes == ["NOT_FOUND"] * LIMIT + ["RESOURCE_EXHAUSTED"] * 2
    assert len([e for e in _audited(server, key_id) if e.action == "lookup.missed"]) == LIMIT


def test_concurrent_misses_of_one_key_never_get_past_the_limit(
    server_factory: Callable[..., RunningServer], database_url: str
) -> None:
    upgrade(database_url)
    limit = 20
    server = server_factory(database_url=database_url, failure_limit=limit, guess_spike_limit=0)
    with posguard.Client(server.target, api_key=server.key("admin")) as admin:
        number = admin.issue_customer_id().customer.primary.number
    key_id, token = _new_key(server, Role.GATEWAY)
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def guess(worker: int) -> None:
        with _stubs(server, token) as stubs:
            start.wait()
            for n in range(4):
                request = C.GetCustomerRequest(customer=_selector(number=_forged(number, worker * 10 + n)))
                try:
                    stubs.call(request)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as error:
                    code = error.code()
                with lock:
                    codes.append(code)

    threads = [threading.Thread(target=guess, args=(w,)) for w in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert codes.count(grpc.StatusCode.NOT_FOUND) == limit  # answered: exactly the limit, no more
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 64 - limit
    assert len([e for e in _audited(server, key_id) if e.action == "lookup.missed"]) == limit


def test_concurrent_misses_of_one_key_at_two_server_processes_never_get_past_the_limit(
    database_url: str, tmp_path: Path, cli: Cli, serve_process: ServeProcess
) -> None:
    """The count is the database's: two replicas, each batching its own misses, answer the limit in all."""
    limit, processes, threads, misses = 20, 2, 8, 4
    settings = {"POSGUARD_FAILURE_LIMIT": str(limit), "POSGUARD_GUESS_SPIKE_LIMIT": "0"}
    token, ports = start_replicas(database_url, tmp_path, cli, serve_process, processes, settings)
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()
    start = threading.Barrier(processes * threads)

    def guess(port: int, worker: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = customer_ids_pb2_grpc.CustomerIdsStub(channel)
            metadata = (("authorization", f"Bearer {token}"),)
            start.wait()
            for n in range(misses):
                request = C.ResolveExternalIdRequest(external_id=_external(worker * 10 + n))
                try:
                    stub.ResolveExternalId(request, metadata=metadata, timeout=30)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as error:
                    code = error.code()
                with lock:
                    codes.append(code)

    workers = [
        threading.Thread(target=guess, args=(port, p * threads + t))
        for p, port in enumerate(ports)
        for t in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert codes.count(grpc.StatusCode.NOT_FOUND) == limit  # answered: exactly the limit, no more
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == processes * threads * misses - limit


def _wrong_code(secret: str) -> str:
    right = posguard.dynamic_code(secret)
    return right[:10] + f"{(int(right[10:]) + 1) % 10**8:08d}"


def test_wrong_codes_against_one_enrolment_are_limited_over_all_keys(
    server_factory: Callable[..., RunningServer], database_url: str
) -> None:
    upgrade(database_url)
    server = server_factory(
        database_url=database_url, failure_limit=100, code_failure_limit=5, guess_spike_limit=0
    )
    with posguard.Client(server.target, api_key=server.key("admin")) as admin:
        target = admin.issue_customer_id().customer.primary.number
        bystander = admin.issue_customer_id().customer.primary.number
        secret = admin.enroll_dynamic_codes(number=target).secret
        other_secret = admin.enroll_dynamic_codes(number=bystander).secret
    tokens = [_new_key(server, Role.GATEWAY)[1] for _ in range(5)]
    for token in tokens:  # five keys, one wrong code each: under every key's limit, at the enrolment's
        with _stubs(server, token) as stubs:
            answer = stubs.call(
                C.RedeemDynamicCodeRequest(code=_wrong_code(secret), merchant_id="m-1", request_id=_rid()),
            )
            assert answer.reason == C.REDEMPTION_REASON_UNKNOWN_CODE
    with _stubs(server, server.key("gateway")) as stubs:
        right = posguard.dynamic_code(secret)
        for request in [
            C.RedeemDynamicCodeRequest(code=right, merchant_id="m-1", request_id=_rid()),
            R.ScoreTransactionRequest(transaction=_txn(dynamic_code=right)),
        ]:
            with pytest.raises(grpc.RpcError) as locked:
                stubs.call(request)
            assert locked.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, _rpc_of(request)
            assert "TOO_MANY_CODE_FAILURES" in str(locked.value.trailing_metadata())
        # Another customer's codes are not affected.
        answer = stubs.call(
            C.RedeemDynamicCodeRequest(
                code=posguard.dynamic_code(other_secret), merchant_id="m-1", request_id=_rid()
            ),
        )
        assert answer.redeemed


def test_misses_across_many_keys_that_spike_are_reported(
    server_factory: Callable[..., RunningServer], database_url: str
) -> None:
    upgrade(database_url)
    server = server_factory(database_url=database_url, failure_limit=100, guess_spike_limit=6)
    with posguard.Client(server.target, api_key=server.key("admin")) as admin:
        number = admin.issue_customer_id().customer.primary.number
    for k in range(4):  # four keys, three misses each: far under each key's limit
        with _stubs(server, _new_key(server, Role.GATEWAY)[1]) as stubs:
            for n in range(3):
                request = C.GetCustomerRequest(customer=_selector(number=_forged(number, k * 10 + n)))
                with pytest.raises(grpc.RpcError):
                    stubs.call(request)
    registry = server.server.metrics.registry
    assert registry.get_sample_value("posguard_guess_spikes_total") == 1  # once per window, not per miss
    assert registry.get_sample_value("posguard_guesses_total", {"method": "GetCustomer"}) == 12
    with server.server.database.session(read_only=True) as session:
        spikes = list(session.scalars(select(SqlAuditEvent).where(SqlAuditEvent.action == "guessing.spike")))
    assert len(spikes) == 1
    assert json.loads(spikes[0].details)["misses"] == "6"


@contextmanager
def _sqlite_write_lock(server: RunningServer) -> Iterator[None]:
    """Hold SQLite's write lock from a connection of the test's own: the server's writes wait meanwhile."""
    db = sqlite3.connect(str(server.settings.data_dir / "posguard.db"), isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        db.execute("ROLLBACK")
        db.close()


# A miss answered only once its count is written (Verify's on SQLite), and one of a guarded RPC.
_LEAVING = [next(c for c in CASES if c.rpc == rpc) for rpc in ("VerifyCustomerId", "ResolveExternalId")]


@pytest.mark.parametrize("case", _LEAVING, ids=lambda c: c.rpc)
def test_a_miss_is_counted_even_when_its_caller_leaves_before_the_count_is_written(
    server_factory: Callable[..., RunningServer], case: Case
) -> None:
    """A caller that gives up while its miss's count waits must not have guessed for free.

    On SQLite a valid number is verified from a read on the event loop, at once, and a miss is answered once
    its count is written: with a deadline shorter than that wait, DEADLINE_EXCEEDED itself would tell a
    guess from a valid number. The test holds the database's write lock so that every count waits past its
    caller's deadline; once the lock is let go, the counts are written and the key is refused, on every
    call that names a customer.
    """
    server = server_factory(failure_limit=LIMIT, guess_spike_limit=0)
    with posguard.Client(server.target, api_key=server.key("admin")) as admin:
        external = common_pb2.ExternalId(namespace="crm", value="known-1")
        number = admin.issue_customer_id(external_ids=[external]).customer.primary.number
    known = Known("", number, external, "")
    key_id, token = _new_key(server, Role.GATEWAY)
    with _stubs(server, token) as stubs:
        stubs.call(case.hit(known))  # the key verified and cached before the lock
        rpc = getattr(stubs.customer_ids, case.rpc)
        with _sqlite_write_lock(server):
            if case.rpc == "VerifyCustomerId":  # what the oracle would be: a valid number answered at once
                assert rpc(case.hit(known), metadata=stubs.metadata, timeout=0.3).valid
            for n in range(LIMIT):
                with pytest.raises(grpc.RpcError) as left:
                    rpc(case.miss(known, n), metadata=stubs.metadata, timeout=0.3)
                assert left.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Once the counts are written, the server knows the key is refused, though no caller waited for it:
        # a hit is refused too, or a key past its limit could still tell hits from misses by the delay.
        assert _refused_soon(lambda: stubs.call(case.hit(known))), "a hit was answered past the limit"
        with pytest.raises(grpc.RpcError) as refused:
            stubs.call(case.miss(known, LIMIT))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    assert len([e for e in _audited(server, key_id) if e.action == case.audited_as]) == LIMIT


def _refused_soon(call: Callable[[], Any], seconds: float = 5.0) -> bool:
    """Whether ``call`` is refused (RESOURCE_EXHAUSTED) within ``seconds``, asked again until then."""
    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        try:
            call()
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return True
            raise
        time.sleep(0.05)
    return False
