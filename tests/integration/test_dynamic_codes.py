"""Dynamic codes end to end: enrolment, offline codes from the client library, server issuance, redemption."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import func, select

import posguard
from posguard.dynamic_codes import PERIOD_SECONDS, code_at_step, time_step
from posguard.v1 import common_pb2, customer_ids_pb2
from posguard_server.domain.check_digits import compute
from posguard_server.store.dynamic_codes import (
    SqlDynamicCodeAttempt,
    SqlDynamicCodeUse,
    SqlDynamicEnrollment,
)

if TYPE_CHECKING:
    from .conftest import RunningServer

V = customer_ids_pb2
R = customer_ids_pb2.RedemptionReason


pytestmark = pytest.mark.usefixtures("not_at_a_step_edge")


def count(server: RunningServer, model: type) -> int:
    with server.server.database.session(read_only=True) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def issue(client: posguard.Client) -> str:
    number: str = client.issue_customer_id().customer.primary.number
    return number


def redeem(client: posguard.Client, code: str, **fields: Any) -> V.RedeemDynamicCodeResponse:
    answer: V.RedeemDynamicCodeResponse = client.redeem_dynamic_code(code=code, merchant_id="m-1", **fields)
    return answer


def at_offset(secret: str, steps: int) -> str:
    """The code of the step ``steps`` away from now, made with an explicit time as a device would."""
    return posguard.dynamic_code(secret, at=time.time() + steps * PERIOD_SECONDS)


def test_an_offline_code_redeems_once_and_a_replay_is_refused(server: RunningServer) -> None:
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        number = issue(client)
        enrolled = client.enroll_dynamic_codes(number=number)
        assert enrolled.secret.startswith("pgd1.")
        assert (enrolled.period_seconds, enrolled.digits) == (60, 18)
        handle, base32 = enrolled.secret.split(".")[1:]
        assert len(handle) == 10
        assert handle not in number
        assert enrolled.provisioning_uri == (
            f"otpauth://totp/posguard:{number[:4]}{'*' * (len(number) - 8)}{number[-4:]}"
            f"?secret={base32}&issuer=posguard&algorithm=SHA256&digits=8&period=60"
        )

        code = posguard.dynamic_code(enrolled.secret)
        assert code.startswith(handle)
        first = redeem(
            client,
            f"{code[:6]} {code[6:12]}-{code[12:]}",
            amount=common_pb2.Money(amount_minor=1250, currency="CNY"),
        )
        assert first.redeemed
        assert first.reason == R.REDEMPTION_REASON_OK
        assert first.number == number
        assert first.customer_id.startswith("cus_")
        again = redeem(client, code)
        assert not again.redeemed
        assert again.reason == R.REDEMPTION_REASON_ALREADY_USED
        assert (again.customer_id, again.number) == ("", "")  # a refusal names no customer

        # A code from one step ahead (the device's clock is fast) is accepted, once.
        ahead = at_offset(enrolled.secret, 1)
        assert redeem(client, ahead).reason == R.REDEMPTION_REASON_OK
        assert redeem(client, at_offset(enrolled.secret, -3)).reason == R.REDEMPTION_REASON_EXPIRED
        # Beyond the accepted window and the expired range a code is not attributed at all.
        far = redeem(client, at_offset(enrolled.secret, 3))
        assert (far.reason, far.customer_id, far.number) == (R.REDEMPTION_REASON_UNKNOWN_CODE, "", "")
        unknown_handle = str((int(handle) + 1) % 10**10).zfill(10) + code[10:]
        assert redeem(client, unknown_handle).reason == R.REDEMPTION_REASON_UNKNOWN_CODE
        assert redeem(client, "1234").reason == R.REDEMPTION_REASON_MALFORMED

    with server.server.database.session(read_only=True) as session:
        enrollment = session.scalar(select(SqlDynamicEnrollment))
        assert enrollment is not None
        # ALREADY_USED, EXPIRED and the far-off code were refusals against this enrolment; one was a replay.
        assert (enrollment.refusals, enrollment.replays) == (3, 1)
        assert base32.encode() not in enrollment.secret_ciphertext
    assert count(server, SqlDynamicCodeUse) == 2


def test_wrong_customer_does_not_consume_the_code(server: RunningServer) -> None:
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        number, other = issue(client), issue(client)
        secret = client.enroll_dynamic_codes(number=number).secret
        code = posguard.dynamic_code(secret)
        wrong = redeem(client, code, expected_number=other)
        assert (wrong.redeemed, wrong.reason) == (False, R.REDEMPTION_REASON_WRONG_CUSTOMER)
        spaced = " ".join(number[i : i + 4] for i in range(0, len(number), 4))
        right = redeem(client, code, expected_number=spaced)
        assert (right.redeemed, right.reason, right.number) == (True, R.REDEMPTION_REASON_OK, number)


def test_a_suspended_number_refuses_codes(server: RunningServer) -> None:
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        number = issue(client)
        secret = client.enroll_dynamic_codes(number=number).secret
    with posguard.Client(server.target, api_key=server.key("admin")) as admin:
        admin.suspend_customer_id(number=number, reason="card lost")
        answer = redeem(admin, posguard.dynamic_code(secret))
        assert answer.reason == R.REDEMPTION_REASON_NUMBER_NOT_ACTIVE
        assert answer.number == ""
        with pytest.raises(posguard.FailedPreconditionError):
            admin.issue_dynamic_code(number=number)
        with pytest.raises(posguard.FailedPreconditionError):
            admin.enroll_dynamic_codes(number=number, replace_existing=True)
        admin.reactivate_customer_id(number=number, reason="found")
        assert redeem(admin, posguard.dynamic_code(secret)).redeemed


def test_a_sub_number_takes_codes_only_while_its_primary_is_active(server: RunningServer) -> None:
    """As verification judges a sub number by its customer's primary, so does IssueDynamicCode."""
    with posguard.Client(server.target, api_key=server.key("admin")) as admin:
        number = issue(admin)
        sub = admin.issue_sub_id(primary_number=number, label="family card").sub_number.number
        admin.enroll_dynamic_codes(number=number)  # the customer enrols with its primary number
        assert admin.issue_dynamic_code(number=sub).code
        admin.suspend_customer_id(number=number, reason="card lost")
        with pytest.raises(posguard.FailedPreconditionError) as caught:
            admin.issue_dynamic_code(number=sub)
        assert caught.value.reason == "NUMBER_NOT_ACTIVE"
        assert "primary number is suspended" in str(caught.value)
        admin.reactivate_customer_id(number=number, reason="found")
        assert admin.issue_dynamic_code(number=sub).code


def test_a_code_issued_by_the_server_redeems(server: RunningServer) -> None:
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        number = issue(client)
        with pytest.raises(posguard.FailedPreconditionError) as caught:
            client.issue_dynamic_code(number=number)
        assert caught.value.reason == "NOT_ENROLLED"
        secret = client.enroll_dynamic_codes(number=number).secret
        issued = client.issue_dynamic_code(number=number)
        step = time_step(issued.valid_from.ToDatetime().timestamp())
        assert issued.code == code_at_step(secret, step)
        assert issued.valid_until.seconds - issued.valid_from.seconds == 60
        assert issued.valid_from.seconds <= time.time() < issued.valid_until.seconds
        assert redeem(client, issued.code).redeemed
        with pytest.raises(posguard.NotFoundError):
            client.issue_dynamic_code(number=unissued(number))
        with pytest.raises(posguard.NotFoundError):
            client.enroll_dynamic_codes(number=unissued(number))


def unissued(number: str) -> str:
    """A well-formed number (valid check digits) next to an issued one, never issued itself."""
    body = number[:-3] + str((int(number[-3]) + 1) % 10)
    return body + compute(body)


def test_enrolling_again_needs_replace_and_retires_the_old_secret(server: RunningServer) -> None:
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        number = issue(client)
        first = client.enroll_dynamic_codes(request_id="e-1", number=number)
        # A retry with the same request_id is the same enrolment, not a second one.
        retry = client.enroll_dynamic_codes(request_id="e-1", number=number)
        assert retry.secret == first.secret
        assert retry.enrolled_at == first.enrolled_at
        with pytest.raises(posguard.InvalidArgumentError) as conflict:
            client.enroll_dynamic_codes(request_id="e-1", number=number, replace_existing=True)
        assert conflict.value.reason == "IDEMPOTENCY_CONFLICT"
        with pytest.raises(posguard.FailedPreconditionError) as caught:
            client.enroll_dynamic_codes(request_id="e-2", number=number)
        assert caught.value.reason == "ALREADY_ENROLLED"

        second = client.enroll_dynamic_codes(request_id="e-3", number=number, replace_existing=True)
        assert second.secret.split(".")[1] != first.secret.split(".")[1]
        old = redeem(client, posguard.dynamic_code(first.secret))
        assert (old.reason, old.customer_id) == (R.REDEMPTION_REASON_UNKNOWN_CODE, "")
        assert redeem(client, posguard.dynamic_code(second.secret)).redeemed
    assert count(server, SqlDynamicEnrollment) == 1


def test_a_retried_redemption_gets_the_first_answer(server: RunningServer) -> None:
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        secret = client.enroll_dynamic_codes(number=issue(client)).secret
        code = posguard.dynamic_code(secret)
        first = redeem(client, code, request_id="pay-1")
        assert first.redeemed
        assert redeem(client, code, request_id="pay-1") == first
        assert redeem(client, code, request_id="pay-2").reason == R.REDEMPTION_REASON_ALREADY_USED
        with pytest.raises(posguard.InvalidArgumentError) as caught:
            redeem(client, at_offset(secret, 1), request_id="pay-1")
        assert caught.value.reason == "IDEMPOTENCY_CONFLICT"
        assert [v.field for v in caught.value.field_violations] == ["request_id"]
    assert count(server, SqlDynamicCodeAttempt) == 2


def test_the_secret_never_reaches_the_audit_log(server: RunningServer) -> None:
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        number = issue(client)
        enrolled = client.enroll_dynamic_codes(number=number)
        code = posguard.dynamic_code(enrolled.secret)
        redeem(client, code)
        redeem(client, code)
    with posguard.Client(server.target, api_key=server.key("auditor")) as auditor:
        events = list(auditor.list_audit_events(page_size=1000).events)
    actions = [e.action for e in events]
    assert "dynamic_code.enrolled" in actions
    assert "dynamic_code.redeemed" in actions
    refused = [e for e in events if e.action == "dynamic_code.refused"]
    assert [e.details["reason"] for e in refused] == ["ALREADY_USED"]
    key = enrolled.secret.split(".")[2]
    for event in events:
        text = str(event)
        for secret_part in (key, enrolled.secret, code, code[10:], number):
            assert secret_part not in text


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"code": ""}, "code"),
        ({"code": "1" * 65}, "code"),
        ({"merchant_id": ""}, "merchant_id"),
        ({"merchant_id": "m" * 65}, "merchant_id"),
        ({"expected_number": "not a number"}, "expected_number"),
        ({"request_id": "r\x00"}, "request_id"),
        ({"request_id": "r" * 129}, "request_id"),
        ({"amount": common_pb2.Money(amount_minor=-5, currency="CNY")}, "amount.amount_minor"),
        ({"amount": common_pb2.Money(amount_minor=5, currency="cny")}, "amount.currency"),
    ],
)
def test_bad_redemptions_are_invalid_argument_and_change_nothing(
    server: RunningServer, fields: dict[str, Any], field: str
) -> None:
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        secret = client.enroll_dynamic_codes(number=issue(client)).secret
        code = posguard.dynamic_code(secret)
        with pytest.raises(posguard.InvalidArgumentError) as caught:
            client.redeem_dynamic_code(**{"code": code, "merchant_id": "m-1", **fields})
        assert [v.field for v in caught.value.field_violations] == [field]
        assert count(server, SqlDynamicCodeAttempt) == 0
        # The code was not touched: it still redeems.
        assert redeem(client, code).redeemed


@pytest.mark.parametrize("rpc", ["enroll_dynamic_codes", "issue_dynamic_code"])
@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"number": ""}, "number"),
        ({"number": "1234 5678"}, "number"),
        ({"number": "9" * 65}, "number"),
        ({"request_id": "r" * 129}, "request_id"),
    ],
)
def test_bad_enrolments_and_issues_are_invalid_argument(
    server: RunningServer, rpc: str, fields: dict[str, Any], field: str
) -> None:
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        number = issue(client)
        with pytest.raises(posguard.InvalidArgumentError) as caught:
            getattr(client, rpc)(**{"number": number, **fields})
        assert [v.field for v in caught.value.field_violations] == [field]
    assert count(server, SqlDynamicEnrollment) == 0


def test_a_refused_redemption_names_no_customer(server: RunningServer) -> None:
    """The merchant holding someone else's code (or a used one) learns nothing about its owner."""
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        number, other = issue(client), issue(client)
        code = posguard.dynamic_code(client.enroll_dynamic_codes(number=number).secret)
        refusals = [
            redeem(client, code, expected_number=other),  # WRONG_CUSTOMER
            redeem(client, at_offset(client.enroll_dynamic_codes(number=other).secret, -3)),  # EXPIRED
        ]
        paid = redeem(client, code, request_id="pay-ok")
        refusals.append(redeem(client, code))  # ALREADY_USED
    assert [r.reason for r in refusals] == [
        R.REDEMPTION_REASON_WRONG_CUSTOMER,
        R.REDEMPTION_REASON_EXPIRED,
        R.REDEMPTION_REASON_ALREADY_USED,
    ]
    assert all((r.customer_id, r.number) == ("", "") for r in refusals)
    assert (paid.redeemed, paid.number) == (True, number)
    assert paid.customer_id
