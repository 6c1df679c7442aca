"""IssueCustomerId and IssueDynamicCode in batches of concurrent calls.

The store tests hand a batch to ``SqlIssuanceStore.issue_many`` or ``SqlDynamicCodeStore.enrolments_to_issue``
directly, as the group commit would under load; the server tests drive them through gRPC with concurrent
callers, and race one request through two servers on one database.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import event, func, insert, select

import posguard
import posguard.aio
from posguard.errors import AlreadyExistsError, FailedPreconditionError, NotFoundError
from posguard.v1 import common_pb2
from posguard_server.domain.check_digits import compute
from posguard_server.domain.customers import ExternalRef
from posguard_server.domain.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from posguard_server.issuers import build_numbering
from posguard_server.store.audit import SqlAuditEvent
from posguard_server.store.customers import (
    Allocated,
    NewCustomer,
    SqlCustomer,
    SqlCustomerNumber,
    SqlCustomerStore,
    SqlExternalId,
    SqlNumberCounter,
    static_number_columns,
)
from posguard_server.store.driver import DriverConnection
from posguard_server.store.dynamic_codes import SqlDynamicCodeStore, StoredEnrollment
from posguard_server.store.issuance import ISSUED, Issuance, Issued, SqlIssuanceStore
from posguard_server.store.migrate import upgrade

from .conftest import race_a_revocation

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from posguard_server.store.customers import MakeNumber

    from .conftest import RunningServer


def _batching_server(
    server_factory: Callable[..., RunningServer],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    store: type,
    method: str,
) -> tuple[RunningServer, list[int]]:
    """A server (shedding no call) whose ``store.method`` records the size of each batch it is handed."""
    sizes: list[int] = []
    batched = getattr(store, method)

    def recording(self: Any, items: Sequence[Any]) -> Any:
        sizes.append(len(items))
        return batched(self, items)

    monkeypatch.setattr(store, method, recording)  # before the server binds the store's method
    upgrade(database_url)
    return server_factory(database_url=database_url, max_concurrent_rpcs=100), sizes


def _count(server: RunningServer, model: type, *where: Any) -> int:
    with server.server.database.session(read_only=True) as session:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def _forged(number: str) -> str:
    """A well-formed number of the same prefix, with valid check digits, that was never issued."""
    body = number[:10] + f"{(int(number[10:18]) + 1) % 10**8:08d}"
    return body + compute(body)


class _Issuer:
    """Issuances of the server's default scheme, as IssueCustomerId makes them."""

    def __init__(self, server: RunningServer) -> None:
        self.numbering = build_numbering(server.settings)
        scheme = self.numbering.scheme()
        assert scheme is not None
        self.scheme = scheme
        self.made = 0

    def make_number(self, prefix: str, counter: int) -> tuple[str, int]:
        return self.numbering.make_number(self.scheme, prefix, counter)

    def item(
        self,
        request_id: str,
        *,
        fingerprint: str = "f-1",
        actor: str = "gateway-1",
        refs: Sequence[ExternalRef] = (),
        make_number: MakeNumber | None = None,
    ) -> Issuance:
        self.made += 1
        new = NewCustomer(
            customer_id=f"cus_batch{self.made:04d}",
            issuer=self.scheme.issuer,
            prefix=self.scheme.prefix(),
            holder_ciphertext=b"sealed" if self.made % 2 else None,
            holder_key_version=1 if self.made % 2 else None,
            external_ids=tuple(refs),
        )
        return Issuance(
            new,
            make_number=make_number or self.make_number,
            request_id=request_id,
            fingerprint=fingerprint,
            actor=actor,
            now=datetime.now(UTC),
        )


def test_one_batch_issues_replays_and_refuses_each_call_on_its_own(migrated_server: RunningServer) -> None:
    issuer = _Issuer(migrated_server)
    store = SqlIssuanceStore(migrated_server.server.database)
    shop = ExternalRef("shop", "c-1")
    batch = [
        issuer.item("r-1", refs=[shop]),
        issuer.item("r-1"),  # a retry of the first, in the same batch: its customer again
        issuer.item("r-1", fingerprint="f-other"),  # the same request_id for another request
        issuer.item("r-2", refs=[ExternalRef("bank", "b-1"), shop]),  # the first call took shop:c-1
        issuer.item("r-3", refs=[ExternalRef("bank", "b-1")]),  # not taken: the call above made nothing
        issuer.item("r-1", actor="gateway-2"),  # another caller's request_id of the same text
    ]
    first, retry, conflict, taken, third, theirs = store.issue_many(batch)
    assert isinstance(first, Issued)
    assert not first.replayed
    assert first.stored.customer.external_ids == (shop,)
    assert retry == Issued(first.stored, replayed=True)
    assert isinstance(conflict, InvalidArgument)
    assert conflict.reason == "IDEMPOTENCY_CONFLICT"
    assert isinstance(taken, AlreadyExists)
    assert (taken.reason, dict(taken.metadata)) == ("EXTERNAL_ID_TAKEN", {"namespace": "shop"})
    assert isinstance(third, Issued)
    assert isinstance(theirs, Issued)
    assert not third.replayed
    assert not theirs.replayed
    made = [first, third, theirs]
    assert len({m.stored.customer.primary.number for m in made}) == 3
    # What the batch answers is what a look-up reads back.
    customers = SqlCustomerStore(migrated_server.server.database)
    for answer in made:
        assert customers.get(customer_id=answer.stored.customer.customer_id) == answer.stored
    assert _count(migrated_server, SqlCustomer) == 3
    assert _count(migrated_server, SqlCustomerNumber) == 3
    assert _count(migrated_server, SqlExternalId) == 2
    assert _count(migrated_server, SqlAuditEvent, SqlAuditEvent.action == ISSUED) == 3
    with migrated_server.server.database.session(read_only=True) as session:
        counters = sorted(session.scalars(select(SqlCustomerNumber.counter)))
        assert counters == [0, 1, 2]  # one counter per customer made, none for the replay or the refusals
        row = session.get(SqlNumberCounter, issuer.scheme.prefix())
        assert row is not None
        assert row.next_value == 3

    # In a later batch the stored call is replayed as it is now, and a conflict is still one.
    later_retry, later_conflict = store.issue_many([issuer.item("r-1"), issuer.item("r-1", fingerprint="x")])
    assert later_retry == Issued(first.stored, replayed=True)
    assert isinstance(later_conflict, InvalidArgument)
    assert _count(migrated_server, SqlCustomer) == 3


def test_a_call_whose_prefix_has_no_number_left_fails_alone(migrated_server: RunningServer) -> None:
    """The prefix's last number goes to the first call; the next call is refused with FAILED_PRECONDITION, and
    the rest of its batch is issued and answered as usual; through gRPC it reads the same."""
    issuer = _Issuer(migrated_server)
    database = migrated_server.server.database
    prefix, last = issuer.scheme.prefix(), issuer.scheme.capacity - 1
    with database.session() as session:
        session.add(SqlNumberCounter(prefix=prefix, next_value=last))
    store = SqlIssuanceStore(database)
    made, none_left, retry = store.issue_many([issuer.item("a"), issuer.item("b"), issuer.item("a")])
    assert isinstance(made, Issued)
    assert isinstance(none_left, FailedPrecondition)
    assert none_left.reason == "SERIAL_SPACE_USED_UP"
    assert retry == Issued(made.stored, replayed=True)
    assert _count(migrated_server, SqlCustomer) == 1
    with database.session(read_only=True) as session:
        assert list(session.scalars(select(SqlCustomerNumber.counter))) == [last]
    with (
        posguard.Client(migrated_server.target, api_key=migrated_server.key("admin")) as admin,
        pytest.raises(FailedPreconditionError) as refused,
    ):
        admin.issue_customer_id()
    assert refused.value.reason == "SERIAL_SPACE_USED_UP"
    assert _count(migrated_server, SqlCustomer) == 1


def test_a_request_id_committed_by_another_transaction_meanwhile_is_replayed(
    migrated_server: RunningServer,
) -> None:
    """Another transaction holds the request_id uncommitted while the batch reads, and commits while the batch
    writes: that call and its retry in the batch replay the other transaction's customer, and the rest of the
    batch is issued."""
    issuer = _Issuer(migrated_server)
    database = migrated_server.server.database
    prefix = issuer.scheme.prefix()
    winner = issuer.item("raced")
    made, version = issuer.make_number(prefix, 10**6)  # a counter far from the batch's
    number = Allocated(made, 10**6, version)
    columns = static_number_columns(
        winner.new.customer_id, winner.new.issuer, prefix, number, winner.actor, winner.now, "issued"
    )
    batch = [issuer.item("raced"), issuer.item("other"), issuer.item("raced")]
    results: list[Any] = []
    with database.engine.connect() as other:
        transaction = other.begin()
        other.execute(
            insert(SqlCustomer),
            {
                "customer_id": winner.new.customer_id,
                "issuer": winner.new.issuer,
                "created_at": winner.now,
                "updated_at": winner.now,
                "created_by": winner.actor,
                "request_id": winner.request_id,
                "request_fingerprint": winner.fingerprint,
            },
        )
        other.execute(insert(SqlCustomerNumber), columns)
        thread = threading.Thread(target=lambda: results.extend(SqlIssuanceStore(database).issue_many(batch)))
        thread.start()
        time.sleep(0.5)  # the batch has read (PostgreSQL) or waits to begin (SQLite's one writer)
        transaction.commit()
        thread.join(timeout=30)
    raced, other_call, retry = results
    assert isinstance(raced, Issued)
    assert raced.replayed
    assert raced.stored.customer.customer_id == winner.new.customer_id
    assert raced.stored.customer.primary.number == number.number
    assert retry == raced
    assert isinstance(other_call, Issued)
    assert not other_call.replayed
    assert _count(migrated_server, SqlCustomer) == 2
    assert _count(migrated_server, SqlAuditEvent, SqlAuditEvent.action == ISSUED) == 1


def test_a_batch_costs_the_same_statements_whatever_its_size(
    migrated_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Core statements per batch, not per call: a batch of 24 runs as many statements as a batch of one.

    Counted where they reach the database: through SQLAlchemy (a session) or through the driver (a
    statements unit)."""
    issuer = _Issuer(migrated_server)
    database = migrated_server.server.database
    issuance, codes = SqlIssuanceStore(database), SqlDynamicCodeStore(database)
    statements: list[object] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    through_driver = DriverConnection.execute

    def count_driver(self: DriverConnection, statement: Any, parameters: Any = None) -> Any:
        statements.append(statement)
        return through_driver(self, statement, parameters)

    monkeypatch.setattr(DriverConnection, "execute", count_driver)

    def run(batch: Callable[[list[Any]], object], items: list[Any]) -> int:
        statements.clear()
        batch(items)
        return len(statements)

    event.listen(database.engine, "before_cursor_execute", count)
    try:
        plain = [
            run(issuance.issue_many, [issuer.item(f"p{size}-{n}") for n in range(size)]) for size in (1, 24)
        ]
        assert plain[0] == plain[1]
        linked = [
            run(
                issuance.issue_many,
                [issuer.item(f"l{size}-{n}", refs=[ExternalRef("shop", f"{size}-{n}")]) for n in range(size)],
            )
            for size in (1, 24)
        ]
        assert linked[0] == linked[1] == plain[0] + 2  # the external ids read, and written
        looked_up = [run(codes.enrolments_to_issue, [str(n) for n in range(size)]) for size in (1, 24)]
        assert looked_up[0] == looked_up[1]
    finally:
        event.remove(database.engine, "before_cursor_execute", count)


def test_a_number_already_in_use_is_skipped_for_the_call_it_would_go_to(
    migrated_server: RunningServer,
) -> None:
    """As after a key rotation, a new permutation can make a number an older key made: its counter is
    skipped and the call gets the next one, while the rest of the batch keeps its counters."""
    issuer = _Issuer(migrated_server)
    store = SqlIssuanceStore(migrated_server.server.database)
    first = store.issue(issuer.item("before"))
    taken = first.stored.customer.primary.number

    def colliding(prefix: str, counter: int) -> tuple[str, int]:
        return (taken, 1) if counter == 2 else issuer.make_number(prefix, counter)

    batch = [issuer.item(f"r-{n}", make_number=colliding) for n in range(3)]
    results = store.issue_many(batch)
    assert all(isinstance(r, Issued) for r in results)
    numbers = [r.stored.customer.primary.number for r in results if isinstance(r, Issued)]
    assert taken not in numbers
    assert len(set(numbers)) == 3
    with migrated_server.server.database.session(read_only=True) as session:
        by_number = dict(session.execute(select(SqlCustomerNumber.number, SqlCustomerNumber.counter)).all())
    assert [by_number[n] for n in numbers] == [1, 4, 3]  # counter 2 made a used number: skipped


def test_concurrent_issue_calls_share_batches_and_a_refused_one_fails_alone(
    server_factory: Callable[..., RunningServer], database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, sizes = _batching_server(
        server_factory, database_url, monkeypatch, SqlIssuanceStore, "issue_many"
    )
    key = server.key("gateway")
    with posguard.Client(server.target, api_key=key) as client:
        client.issue_customer_id(external_ids=[common_pb2.ExternalId(namespace="shop", value="taken")])
    sizes.clear()
    calls = 40

    async def issue_all() -> list[Any]:
        async with posguard.aio.Client(server.target, api_key=key) as client:
            requests = []
            for n in range(calls):
                fields: dict[str, Any] = {"request_id": f"r-{n % 30}"}  # ten retries among them
                if n == 7:
                    fields["external_ids"] = [common_pb2.ExternalId(namespace="shop", value="taken")]
                    fields["request_id"] = "refused"
                requests.append(client.issue_customer_id(**fields))
            return await asyncio.gather(*requests, return_exceptions=True)

    answers = asyncio.run(issue_all())
    refused = answers[7]
    assert isinstance(refused, AlreadyExistsError)
    assert refused.reason == "EXTERNAL_ID_TAKEN"
    issued = {n: a for n, a in enumerate(answers) if n != 7}
    assert not [a for a in issued.values() if isinstance(a, BaseException)]
    by_request: dict[str, set[str]] = {}
    for n, answer in issued.items():
        by_request.setdefault(f"r-{n % 30}", set()).add(answer.customer.customer_id)
    assert all(len(ids) == 1 for ids in by_request.values())  # a retry gets the first call's customer
    assert sum(not a.replayed for a in issued.values()) == 30  # one customer made per request_id
    assert sum(sizes) == calls
    assert max(sizes) > 1  # the calls that arrived together were issued together
    assert _count(server, SqlCustomer) == 31  # the customer made first, and one per request_id


def test_one_request_raced_through_two_servers_makes_one_customer(
    server_factory: Callable[..., RunningServer], database_url: str
) -> None:
    upgrade(database_url)
    servers = [server_factory(database_url=database_url) for _ in range(2)]
    key = servers[0].key("gateway")
    answers: list[tuple[str, bool]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(12)

    def issue(worker: int) -> None:
        try:
            with posguard.Client(servers[worker % 2].target, api_key=key, timeout=30) as client:
                start.wait()
                # Every worker sends the same request; each also issues one of its own in the same moment.
                answer = client.issue_customer_id(
                    request_id="raced",
                    external_ids=[common_pb2.ExternalId(namespace="shop", value="raced")],
                )
                client.issue_customer_id(request_id=f"own-{worker}")
            with lock:
                answers.append((answer.customer.customer_id, answer.replayed))
        except BaseException as error:  # reported below; a thread must not die silently
            errors.append(error)

    threads = [threading.Thread(target=issue, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert len({customer_id for customer_id, _ in answers}) == 1
    assert sorted(replayed for _, replayed in answers) == [False] + [True] * 11
    assert _count(servers[0], SqlCustomer) == 13
    assert _count(servers[0], SqlCustomerNumber) == len(
        {n for (n,) in _rows(servers[0], select(SqlCustomerNumber.number))}
    )


def _rows(server: RunningServer, query: Any) -> list[Any]:
    with server.server.database.session(read_only=True) as session:
        return list(session.execute(query).all())


# -- IssueDynamicCode -----------------------------------------------------------------------------------


def test_one_read_decides_every_number_of_a_batch(migrated_server: RunningServer) -> None:
    with posguard.Client(migrated_server.target, api_key=migrated_server.key("admin")) as admin:
        enrolled, suspended, revoked, bare = (admin.issue_customer_id().customer for _ in range(4))
        for customer in (enrolled, suspended, revoked):
            admin.enroll_dynamic_codes(number=customer.primary.number)
        admin.suspend_customer_id(number=suspended.primary.number, reason="check")
        admin.revoke_customer_id(number=revoked.primary.number, reason="closed")
    numbers = [
        enrolled.primary.number,
        _forged(enrolled.primary.number),
        suspended.primary.number,
        revoked.primary.number,
        bare.primary.number,
        enrolled.primary.number,  # the same number twice in one batch
    ]
    answers = SqlDynamicCodeStore(migrated_server.server.database).enrolments_to_issue(numbers)
    good, unknown, paused, closed, unenrolled, again = answers
    assert isinstance(good, StoredEnrollment)
    assert good.customer_id == enrolled.customer_id
    assert again == good
    assert isinstance(unknown, NotFound)
    assert unknown.reason == "NUMBER_NOT_FOUND"
    assert isinstance(paused, FailedPrecondition)
    assert (paused.reason, str(paused)) == ("NUMBER_NOT_ACTIVE", "the number is suspended, not active")
    assert isinstance(closed, FailedPrecondition)
    assert (closed.reason, str(closed)) == ("NUMBER_NOT_ACTIVE", "the number is revoked, not active")
    assert isinstance(unenrolled, FailedPrecondition)
    assert unenrolled.reason == "NOT_ENROLLED"


@pytest.mark.usefixtures("not_at_a_step_edge")
def test_concurrent_code_issues_share_reads_and_a_bad_number_fails_alone(
    server_factory: Callable[..., RunningServer], database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, sizes = _batching_server(
        server_factory, database_url, monkeypatch, SqlDynamicCodeStore, "enrolments_to_issue"
    )
    key = server.key("gateway")
    with posguard.Client(server.target, api_key=key) as client:
        numbers = [client.issue_customer_id().customer.primary.number for _ in range(4)]
        secrets = [client.enroll_dynamic_codes(number=n).secret for n in numbers[:3]]
    presented = [numbers[n % 3] for n in range(30)]
    presented[5] = numbers[3]  # not enrolled
    presented[11] = _forged(numbers[0])  # never issued

    async def issue_all() -> list[Any]:
        async with posguard.aio.Client(server.target, api_key=key) as client:
            calls = [
                client.issue_dynamic_code(number=n, request_id=f"c-{i}") for i, n in enumerate(presented)
            ]
            return await asyncio.gather(*calls, return_exceptions=True)

    answers = asyncio.run(issue_all())
    assert isinstance(answers[5], FailedPreconditionError)
    assert answers[5].reason == "NOT_ENROLLED"
    assert isinstance(answers[11], NotFoundError)
    assert answers[11].reason == "NUMBER_NOT_FOUND"
    for n, answer in enumerate(answers):
        if n not in (5, 11):
            assert answer.code == posguard.dynamic_code(secrets[n % 3])
    assert sum(sizes) == len(presented)
    assert max(sizes) > 1


def test_a_number_revoked_is_never_given_a_code_after_the_revocation(migrated_server: RunningServer) -> None:
    """Code issuers race an operator's revocation: a call sent after it was answered gets no code."""
    with posguard.Client(migrated_server.target, api_key=migrated_server.key("admin")) as admin:
        number = admin.issue_customer_id().customer.primary.number
        admin.enroll_dynamic_codes(number=number)

    def given(client: posguard.Client) -> bool:
        try:
            client.issue_dynamic_code(number=number, request_id=f"i-{uuid.uuid4()}")
        except FailedPreconditionError as error:
            if error.reason != "NUMBER_NOT_ACTIVE":
                raise
            return False
        return True

    race = race_a_revocation(migrated_server, number, given)
    assert any(race.before)
    assert race.after
    assert not any(race.after)
