"""The dynamic-code RPCs of ``posguard.v1.CustomerIds``: enrolment, server-side issuance and redemption.

A mixin of the CustomerIds servicer, which provides the numbering, the customer store and the dynamic-code
store. Codes are computed with the client library's ``posguard.dynamic_codes``, the one definition shared
with customers' devices.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from grpc import aio

from posguard.dynamic_codes import DIGITS, PERIOD_SECONDS, code_of, format_secret, time_step
from posguard.v1 import customer_ids_pb2
from posguard_server.api.convert import timestamp
from posguard_server.api.enumeration import FailureGuard, guarded, refusal
from posguard_server.api.group_commit import GroupCommit
from posguard_server.api.pipeline import current_principal
from posguard_server.api.validation import Checker, fingerprint
from posguard_server.domain.customers import CustomerNumber, NumberKind, mask
from posguard_server.domain.dynamic_codes import (
    GUESSES,
    Reason,
    SecretCipher,
    new_handle,
    new_key,
    parse_code,
    step_bounds,
)
from posguard_server.domain.errors import InvalidArgument
from posguard_server.domain.numbering import Numbering
from posguard_server.store.customers import SqlCustomerStore
from posguard_server.store.dynamic_codes import (
    Attempt,
    Sealed,
    SqlDynamicCodeStore,
    StoredEnrollment,
    inactive_number,
)
from posguard_server.store.redemptions import METHOD, Redeemed, Redemption

Context = aio.ServicerContext[Any, Any]

MAX_NUMBER_INPUT = 64  # a number as typed, with spaces and hyphens
MAX_CODE_INPUT = 64  # a code as typed: 18 digits with room for separators
MAX_MERCHANT = 64
_CURRENCY = re.compile(r"[A-Z]{3}")
# Each reason's value in the contract, looked up once: a reason missing from it fails the import, not a call.
_REASON_TO_PROTO: dict[Reason, customer_ids_pb2.RedemptionReason.ValueType] = {
    reason: customer_ids_pb2.RedemptionReason.Value(f"REDEMPTION_REASON_{reason.name}") for reason in Reason
}


def _now() -> datetime:
    return datetime.now(UTC)


def provisioning_uri(number: str, key_base32: str) -> str:
    """The otpauth:// form of an enrolment, for wallet apps that import one.

    Such an app shows only the 8-digit TOTP suffix of a code; the code to present is the enrolment's
    10-digit handle (the middle part of the secret) followed by those 8 digits.
    """
    label = quote(f"posguard:{mask(number)}", safe=":*")
    return (
        f"otpauth://totp/{label}?secret={key_base32}&issuer=posguard&algorithm=SHA256"
        f"&digits={DIGITS - 10}&period={PERIOD_SECONDS}"
    )


class DynamicCodesRpcs:
    """EnrollDynamicCodes, IssueDynamicCode and RedeemDynamicCode for the CustomerIds servicer."""

    _numbering: Numbering
    _store: SqlCustomerStore
    _dynamic: SqlDynamicCodeStore
    _guard: FailureGuard
    _redemptions: GroupCommit[Redemption, Redeemed]
    _code_issues: GroupCommit[str, StoredEnrollment]

    @property
    def _secrets(self) -> SecretCipher:
        # Built on first use from the servicer's key ring; keys are fixed for the life of the process.
        cipher: SecretCipher | None = getattr(self, "_secret_cipher", None)
        if cipher is None:
            cipher = SecretCipher(dict(self._numbering.keys.keys))
            self._secret_cipher = cipher
        return cipher

    def _number_field(self, check: Checker, value: str, field: str, *, required: bool) -> str | None:
        """A number named in a request, in canonical form; None (with a violation if wrong) otherwise."""
        before = len(check.violations)
        check.text(value, field, required=required, max_length=MAX_NUMBER_INPUT)
        if len(check.violations) > before or not value:
            return None
        recognised = self._numbering.recognise(value)
        if recognised.parsed is None:
            problem = recognised.problem.name.lower().replace("_", " ") if recognised.problem else "malformed"
            check.fail(field, f"is not a valid customer number ({problem})")
            return None
        return recognised.parsed.number

    async def _active_number(self, number: str) -> tuple[CustomerNumber, str]:
        found = await asyncio.to_thread(self._store.find_number, number)
        refused = inactive_number(found[0].status if found is not None else None)
        if refused is not None:
            raise refused
        assert found is not None
        return found

    def _key_of(self, enrollment: StoredEnrollment) -> bytes:
        sealed = enrollment.secret_ciphertext
        return self._secrets.decrypt(sealed, enrollment.customer_id, enrollment.key_version)

    @guarded
    async def EnrollDynamicCodes(
        self, request: customer_ids_pb2.EnrollDynamicCodesRequest, context: Context
    ) -> customer_ids_pb2.EnrollDynamicCodesResponse:
        check = Checker()
        check.request_id(request.request_id)
        number = self._number_field(check, request.number, "number", required=True)
        check.done()
        assert number is not None
        stored, customer_id = await self._active_number(number)
        if stored.kind is not NumberKind.STATIC:
            raise InvalidArgument.field("number", "must be a primary number, not a sub number")
        cipher = self._secrets
        version = self._numbering.keys.current

        def seal() -> Sealed:
            return Sealed(new_handle(), cipher.encrypt(new_key(), customer_id, version), version)

        enrollment, _ = await asyncio.to_thread(
            self._dynamic.enroll,
            customer_id,
            number,
            seal,
            replace_existing=request.replace_existing,
            request_id=request.request_id,
            fingerprint=fingerprint(request),
            actor=current_principal().key_id,
            now=_now(),
        )
        secret = format_secret(enrollment.handle, self._key_of(enrollment))
        return customer_ids_pb2.EnrollDynamicCodesResponse(
            secret=secret,
            period_seconds=PERIOD_SECONDS,
            digits=DIGITS,
            enrolled_at=timestamp(enrollment.enrolled_at),
            provisioning_uri=provisioning_uri(number, secret.rsplit(".", 1)[1]),
        )

    @guarded
    async def IssueDynamicCode(
        self, request: customer_ids_pb2.IssueDynamicCodeRequest, context: Context
    ) -> customer_ids_pb2.IssueDynamicCodeResponse:
        check = Checker()
        check.request_id(request.request_id)
        number = self._number_field(check, request.number, "number", required=True)
        check.done()
        assert number is not None
        # The number's status and its customer's enrolment, read together with the concurrent calls' (its
        # error when the number is not found, not active, or not enrolled).
        enrollment = await self._code_issues.submit(number)
        # Issuing changes nothing on the server: the code is what the device would show for this step, and
        # a retry in the same step gets the same code.
        step = time_step(_now())
        start, end = step_bounds(step)
        return customer_ids_pb2.IssueDynamicCodeResponse(
            code=code_of(enrollment.handle, self._key_of(enrollment), step),
            valid_from=timestamp(datetime.fromtimestamp(start, UTC)),
            valid_until=timestamp(datetime.fromtimestamp(end, UTC)),
        )

    async def RedeemDynamicCode(
        self, request: customer_ids_pb2.RedeemDynamicCodeRequest, context: Context
    ) -> customer_ids_pb2.RedeemDynamicCodeResponse:
        check = Checker()
        check.request_id(request.request_id)
        check.text(request.code, "code", required=True, max_length=MAX_CODE_INPUT)
        expected = self._number_field(check, request.expected_number, "expected_number", required=False)
        check.text(request.merchant_id, "merchant_id", required=True, max_length=MAX_MERCHANT)
        check.text(request.terminal_id, "terminal_id", max_length=MAX_MERCHANT)
        amount = None
        if request.HasField("amount"):
            check.check(request.amount.amount_minor > 0, "amount.amount_minor", "must be positive")
            check.check(
                bool(_CURRENCY.fullmatch(request.amount.currency)),
                "amount.currency",
                "must be an ISO 4217 code of three upper-case letters",
            )
            amount = (request.amount.amount_minor, request.amount.currency)
        check.done()
        now = _now()
        caller = current_principal().key_id
        self._guard.check(caller, now)
        redeemed = await self._redemptions.submit(
            Redemption(
                parse_code(request.code),
                Attempt(
                    request_id=request.request_id,
                    fingerprint=fingerprint(request),
                    expected_number=expected,
                    merchant_id=request.merchant_id,
                    terminal_id=request.terminal_id,
                    amount=amount,
                    actor=caller,
                ),
                now=now,
                now_step=time_step(now),
            ),
            # A refusal this batch ends in is learned even if the caller left while the batch ran.
            then=self._guard.learns(caller),
        )
        answer = redeemed.answer
        if answer is None:
            assert redeemed.refused_until is not None
            raise refusal(redeemed.refused_until, _now())
        if answer.reason in GUESSES and not answer.replayed:  # counted in the batch (a replay was before)
            await self._guard.observe(METHOD)
        paid = answer.reason is Reason.OK
        # A refusal names no customer: the merchant holding someone else's code learns nothing about them.
        return customer_ids_pb2.RedeemDynamicCodeResponse(
            redeemed=paid,
            reason=_REASON_TO_PROTO[answer.reason],
            customer_id=answer.customer_id if paid else "",
            number=answer.number if paid else "",
        )
