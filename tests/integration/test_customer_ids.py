"""CustomerIds end to end: a real server, the real client, on SQLite and on PostgreSQL."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from sqlalchemy import func, select

import posguard
from posguard.v1 import common_pb2, customer_ids_pb2
from posguard_server.domain.check_digits import compute
from posguard_server.store.customers import SqlCustomer, SqlCustomerNumber, SqlCustomerStore
from posguard_server.store.migrate import upgrade

if TYPE_CHECKING:
    from collections.abc import Callable

    from .conftest import Cli, RunningServer

HOLDER = "Zebulon Quixote-Marchetti"
V = customer_ids_pb2


@pytest.fixture
def running(server_factory: Callable[..., RunningServer], database_url: str) -> RunningServer:
    """A server on each backend; a shared database is migrated first, as an operator would."""
    upgrade(database_url)
    return server_factory(database_url=database_url)


def count(server: RunningServer, model: type) -> int:
    with server.server.database.session(read_only=True) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_issue_gives_a_structured_number_and_replays_on_the_same_request_id(running: RunningServer) -> None:
    with posguard.Client(running.target, api_key=running.key("gateway")) as client:
        first = client.issue_customer_id(
            request_id="r-1", holder=V.Holder(name=HOLDER, phone="+86 27 1234 5678")
        )
        number = first.customer.primary
        assert len(number.number) == 20
        assert number.number.startswith("1564201102")
        assert number.number[-2:] == compute(number.number[:-2])
        assert number.display == " ".join(number.number[i : i + 4] for i in range(0, 20, 4))
        assert number.status == common_pb2.NUMBER_STATUS_ACTIVE
        assert number.key_version == 1
        assert not first.replayed
        assert not first.customer.HasField("holder")  # holder details never come back from issuance

        again = client.issue_customer_id(
            request_id="r-1", holder=V.Holder(name=HOLDER, phone="+86 27 1234 5678")
        )
        assert again.replayed
        assert again.customer.primary.number == number.number
        with pytest.raises(posguard.InvalidArgumentError) as caught:
            client.issue_customer_id(request_id="r-1", holder=V.Holder(name="Someone Else"))
        assert caught.value.reason == "IDEMPOTENCY_CONFLICT"
        assert [v.field for v in caught.value.field_violations] == ["request_id"]
    assert count(running, SqlCustomer) == 1


def test_the_holder_is_encrypted_at_rest_and_shown_to_admins_only(server: RunningServer) -> None:
    with posguard.Client(server.target, api_key=server.key("gateway")) as gateway:
        issued = gateway.issue_customer_id(holder=V.Holder(name=HOLDER, phone="+86 27 1234 5678"))
        number = issued.customer.primary.number
        as_gateway = gateway.get_customer(
            customer=common_pb2.CustomerSelector(number=number), include_holder=True
        )
        assert not as_gateway.customer.HasField("holder")
    with posguard.Client(server.target, api_key=server.key("admin")) as admin:
        as_admin = admin.get_customer(
            customer=common_pb2.CustomerSelector(number=number), include_holder=True
        )
        assert as_admin.customer.holder.name == HOLDER
    # The database file and its write-ahead log, wherever the row may be at this moment.
    data_dir = server.settings.data_dir
    for path in data_dir.glob("posguard.db*"):
        blob = path.read_bytes()
        assert HOLDER.encode() not in blob, path.name
        assert b"Zebulon" not in blob
        assert b"1234 5678" not in blob


def with_check(body: str) -> str:
    return body + compute(body)


def test_verify_answers_for_every_kind_of_input(running: RunningServer) -> None:
    with posguard.Client(running.target, api_key=running.key("gateway")) as client:
        number = client.issue_customer_id().customer.primary.number
        ok = client.verify_customer_id(number=f" {number[:4]}-{number[4:8]} {number[8:]} ")
        assert (ok.valid, ok.reason, ok.normalized_number) == (True, V.VERIFICATION_REASON_OK, number)
        assert ok.status == common_pb2.NUMBER_STATUS_ACTIVE
        assert ok.display == " ".join(number[i : i + 4] for i in range(0, 20, 4))
        never_issued = with_check(number[:10] + ("00000000" if number[10:18] != "00000000" else "00000001"))
        typo = number[:5] + str((int(number[5]) + 1) % 10) + number[6:]
        cases = {
            "12345": V.VERIFICATION_REASON_MALFORMED,
            number + "0": V.VERIFICATION_REASON_MALFORMED,
            "1564 2011 02AB CDEF 1234": V.VERIFICATION_REASON_MALFORMED,
            typo: V.VERIFICATION_REASON_CHECK_DIGITS,
            never_issued: V.VERIFICATION_REASON_NOT_FOUND,
            with_check("250" + number[3:18]): V.VERIFICATION_REASON_UNKNOWN_ISSUER,
        }
        for presented, reason in cases.items():
            answer = client.verify_customer_id(number=presented)
            assert (answer.valid, answer.reason) == (False, reason), presented


def test_lifecycle_follows_the_state_machine(running: RunningServer) -> None:
    with posguard.Client(running.target, api_key=running.key("admin")) as admin:
        number = admin.issue_customer_id().customer.primary.number

        def verify(value: str) -> V.VerifyCustomerIdResponse:
            return admin.verify_customer_id(number=value)

        suspended = admin.suspend_customer_id(request_id="s-1", number=number, reason="card lost")
        assert suspended.customer.primary.status == common_pb2.NUMBER_STATUS_SUSPENDED
        assert suspended.customer.primary.status_reason == "card lost"
        assert verify(number).reason == V.VERIFICATION_REASON_SUSPENDED
        # a retry of the same call changes nothing and answers again
        again = admin.suspend_customer_id(request_id="s-1", number=number, reason="card lost")
        assert again.customer.primary.status == common_pb2.NUMBER_STATUS_SUSPENDED
        with pytest.raises(posguard.FailedPreconditionError) as caught:
            admin.suspend_customer_id(number=number, reason="again")
        assert caught.value.reason == "ILLEGAL_TRANSITION"

        admin.reactivate_customer_id(number=number, reason="card found")
        assert verify(number).valid

        rotated = admin.rotate_customer_id(number=number, reason="number leaked")
        successor = rotated.customer.primary.number
        assert rotated.previous_number == number
        assert successor != number
        assert successor[:10] == number[:10]
        old = verify(number)
        assert (old.valid, old.reason, old.successor_number) == (
            False,
            V.VERIFICATION_REASON_ROTATED,
            successor,
        )
        assert verify(successor).valid
        with pytest.raises(posguard.FailedPreconditionError):
            admin.reactivate_customer_id(number=number, reason="undo rotation")

        admin.revoke_customer_id(number=successor, reason="customer left")
        assert verify(successor).reason == V.VERIFICATION_REASON_REVOKED
        for call in (admin.reactivate_customer_id, admin.suspend_customer_id, admin.revoke_customer_id):
            with pytest.raises(posguard.FailedPreconditionError):
                call(number=successor, reason="after revocation")
        with pytest.raises(posguard.NotFoundError):
            admin.suspend_customer_id(number=with_check(number[:10] + "00000000"), reason="never issued")


def test_list_customers_filters_and_pages(server: RunningServer) -> None:
    with posguard.Client(server.target, api_key=server.key("admin")) as admin:
        numbers = [admin.issue_customer_id().customer.primary.number for _ in range(5)]
        admin.suspend_customer_id(number=numbers[1], reason="lost")
        seen: list[str] = []
        token = ""
        while True:
            page = admin.list_customers(page_size=2, page_token=token)
            seen.extend(c.primary.number for c in page.customers)
            token = page.next_page_token
            if not token:
                break
        assert seen == numbers
        suspended = admin.list_customers(status=common_pb2.NUMBER_STATUS_SUSPENDED)
        assert [c.primary.number for c in suspended.customers] == [numbers[1]]


def test_failed_verifications_are_counted_per_caller_and_number(server: RunningServer) -> None:
    key = server.key("gateway")
    with posguard.Client(server.target, api_key=key) as client:
        number = client.issue_customer_id().customer.primary.number
        forged = with_check(number[:10] + "87654321")
        for _ in range(3):
            assert not client.verify_customer_id(number=forged).valid
        client.verify_customer_id(number=number)
        store = SqlCustomerStore(server.server.database)
    assert store.failures("caller", key.split("_")[1]) == 3
    assert store.failures("number", forged) == 3
    assert store.failures("number", number) == 0


def test_never_issued_numbers_are_not_found(server_factory: Callable[..., RunningServer]) -> None:
    """100,000 well-formed numbers with valid check digits that were never issued: none is found."""
    import random

    # 200 forgeries from one key is enumeration: the failure limit (test_enumeration.py) would stop it.
    server = server_factory(failure_limit=0)

    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        issued = {client.issue_customer_id().customer.primary.number for _ in range(200)}
        prefix = next(iter(issued))[:10]
        rng = random.Random(7)
        candidates = set()
        while len(candidates) < 100_000:
            body = prefix + f"{rng.randrange(10**8):08d}"
            candidate = body + compute(body)
            if candidate not in issued:
                candidates.add(candidate)
        # All of them against the database in batches; a sample through the RPC as a gateway sends it.
        found = 0
        ordered = sorted(candidates)
        with server.server.database.session(read_only=True) as session:
            for start in range(0, len(ordered), 1000):
                batch = ordered[start : start + 1000]
                found += len(
                    list(
                        session.scalars(
                            select(SqlCustomerNumber.number).where(SqlCustomerNumber.number.in_(batch))
                        )
                    )
                )
        assert found == 0
        for candidate in rng.sample(ordered, 200):
            answer = client.verify_customer_id(number=candidate)
            assert (answer.valid, answer.reason) == (False, V.VERIFICATION_REASON_NOT_FOUND)
        for number in rng.sample(sorted(issued), 20):
            assert client.verify_customer_id(number=number).valid


def test_issuance_lifecycle_and_failed_verifications_are_audited(running: RunningServer) -> None:
    admin_key = running.key("admin")
    with posguard.Client(running.target, api_key=admin_key) as admin:
        number = admin.issue_customer_id(holder=V.Holder(name=HOLDER)).customer.primary.number
        admin.suspend_customer_id(number=number, reason="lost")
        admin.reactivate_customer_id(number=number, reason="found")
        successor = admin.rotate_customer_id(number=number, reason="leak").customer.primary.number
        admin.revoke_customer_id(number=successor, reason="closed")
        admin.verify_customer_id(number=number)  # rotated: a failed verification
    with posguard.Client(running.target, api_key=running.key("auditor")) as auditor:
        events = [
            e for e in auditor.list_audit_events(page_size=100).events if not e.action.startswith("api_key")
        ]
        assert [e.action for e in events] == [
            "customer.issued",
            "customer.suspended",
            "customer.reactivated",
            "customer.rotated",
            "customer.revoked",
            "verification.failed",
        ]
        assert all(e.actor == admin_key.split("_")[1] for e in events)
        assert events[1].details["reason"] == "lost"
        for event in events:  # numbers appear masked, holder details never
            assert number not in str(event)
            assert successor not in str(event)
            assert HOLDER not in str(event)
        assert auditor.verify_audit_log().intact


def test_sub_numbers_resolve_to_their_primary_and_respect_their_scope(running: RunningServer) -> None:
    with posguard.Client(running.target, api_key=running.key("admin")) as admin:
        primary = admin.issue_customer_id().customer
        number = primary.primary.number
        family = admin.issue_sub_id(request_id="sub-1", primary_number=number, label="family card")
        sub = family.sub_number
        assert family.customer_id == primary.customer_id
        assert (sub.kind, sub.primary_number, sub.label) == (
            common_pb2.NUMBER_KIND_SUB,
            number,
            "family card",
        )
        assert sub.number != number
        assert (
            admin.issue_sub_id(request_id="sub-1", primary_number=number, label="family card").sub_number
            == sub
        )
        answer = admin.verify_customer_id(number=sub.number)
        assert (answer.valid, answer.kind, answer.primary_number) == (
            True,
            common_pb2.NUMBER_KIND_SUB,
            number,
        )

        scoped = admin.issue_sub_id(
            primary_number=number, scope=V.SubScope(merchant_id="m-42", channel=common_pb2.CHANNEL_POS)
        ).sub_number
        inside = admin.verify_customer_id(
            number=scoped.number, merchant_id="m-42", channel=common_pb2.CHANNEL_POS
        )
        assert inside.valid
        for merchant, channel in (
            ("m-7", common_pb2.CHANNEL_POS),
            ("m-42", common_pb2.CHANNEL_ONLINE),
            ("", 0),
        ):
            outside = admin.verify_customer_id(number=scoped.number, merchant_id=merchant, channel=channel)
            assert (outside.valid, outside.reason) == (False, V.VERIFICATION_REASON_OUT_OF_SCOPE)

        # The sub follows its customer: suspended with the primary, pointing at the successor after rotation.
        admin.suspend_customer_id(number=number, reason="lost")
        assert admin.verify_customer_id(number=sub.number).reason == V.VERIFICATION_REASON_SUSPENDED
        with pytest.raises(posguard.FailedPreconditionError):
            admin.issue_sub_id(primary_number=number)
        admin.reactivate_customer_id(number=number, reason="found")
        successor = admin.rotate_customer_id(number=number, reason="leak").customer
        after = admin.verify_customer_id(number=sub.number)
        assert (after.valid, after.primary_number) == (True, successor.primary.number)
        assert len(successor.sub_numbers) == 2
        with pytest.raises(posguard.FailedPreconditionError):
            admin.issue_sub_id(primary_number=sub.number)  # a sub number is not a primary


def test_external_ids_link_and_resolve_both_ways(running: RunningServer) -> None:
    bank = common_pb2.ExternalId(namespace="bank", value="acct-1")
    with posguard.Client(running.target, api_key=running.key("gateway")) as client:
        first = client.issue_customer_id(external_ids=[bank]).customer
        second = client.issue_customer_id().customer
        crm = common_pb2.ExternalId(namespace="crm:acme", value="42")
        linked = client.link_external_id(
            customer=common_pb2.CustomerSelector(number=first.primary.number), external_id=crm
        )
        assert (linked.customer_id, linked.replayed) == (first.customer_id, False)
        again = client.link_external_id(
            customer=common_pb2.CustomerSelector(customer_id=first.customer_id), external_id=crm
        )
        assert again.replayed
        with pytest.raises(posguard.AlreadyExistsError) as caught:
            client.link_external_id(
                customer=common_pb2.CustomerSelector(customer_id=second.customer_id), external_id=bank
            )
        assert caught.value.reason == "EXTERNAL_ID_TAKEN"
        with pytest.raises(posguard.AlreadyExistsError):
            client.issue_customer_id(external_ids=[bank])

        by_external = client.resolve_external_id(external_id=crm)
        assert (by_external.customer_id, by_external.primary_number) == (
            first.customer_id,
            first.primary.number,
        )
        by_number = client.resolve_external_id(number=first.primary.number)
        assert {(e.namespace, e.value) for e in by_number.external_ids} == {
            ("bank", "acct-1"),
            ("crm:acme", "42"),
        }
        only_bank = client.resolve_external_id(customer_id=first.customer_id, namespace="bank")
        assert [(e.namespace, e.value) for e in only_bank.external_ids] == [("bank", "acct-1")]
        with pytest.raises(posguard.NotFoundError):
            client.resolve_external_id(external_id=common_pb2.ExternalId(namespace="bank", value="nobody"))


def test_rotating_the_number_key_keeps_old_numbers_valid(
    server_factory: Callable[..., RunningServer], cli: Cli
) -> None:
    first = server_factory()
    with posguard.Client(first.target, api_key=first.key("gateway")) as client:
        old = client.issue_customer_id().customer.primary
    data_dir = first.settings.data_dir
    first.stop()
    rotated = cli("--data-dir", str(data_dir), "number-keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    second = server_factory(data_dir=data_dir)
    with posguard.Client(second.target, api_key=second.key("gateway")) as client:
        new = client.issue_customer_id().customer.primary
        assert (old.key_version, new.key_version) == (1, 2)
        assert client.verify_customer_id(number=old.number).valid
        assert client.verify_customer_id(number=new.number).valid
    with posguard.Client(second.target, api_key=second.key("auditor")) as auditor:
        actions = [e.action for e in auditor.list_audit_events(action="number_key.rotated").events]
        assert actions == ["number_key.rotated"]
