"""The ``posguard.v1.CustomerIds`` service: issuing, verifying and managing customer numbers.

Verifications, redemptions and issuances, what a till or gateway calls per customer, run in batches of
concurrent calls on the database's writer threads (``group_commit``), and look-ups and issued dynamic codes
in batches on reader threads; the other RPCs are one unit of work each.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from datetime import UTC, datetime
from typing import Any

from grpc import aio

from posguard.v1 import common_pb2, customer_ids_pb2, customer_ids_pb2_grpc
from posguard_server.api import customer_messages as messages
from posguard_server.api.dynamic_codes import MAX_NUMBER_INPUT, DynamicCodesRpcs
from posguard_server.api.enumeration import FailureGuard, guarded, refusal
from posguard_server.api.group_commit import AfterTheAnswer, GroupCommit, Writers
from posguard_server.api.pipeline import current_principal
from posguard_server.api.validation import Checker, fingerprint, make_page_token
from posguard_server.domain.api_keys import Role
from posguard_server.domain.customers import (
    ExternalRef,
    Holder,
    HolderCipher,
    Transition,
)
from posguard_server.domain.numbering import Numbering
from posguard_server.domain.verification import BY_PROBLEM, GUESSES, Verdict
from posguard_server.store.customers import CustomerLookup, NewCustomer, SqlCustomerStore, StoredCustomer
from posguard_server.store.dynamic_codes import SqlDynamicCodeStore
from posguard_server.store.issuance import Issuance, Issued, SqlIssuanceStore
from posguard_server.store.redemptions import SqlRedemptionStore
from posguard_server.store.verifications import METHOD as VERIFY_METHOD
from posguard_server.store.verifications import (
    LocalReads,
    Presented,
    SqlVerificationStore,
    Verification,
    Verified,
)

Context = aio.ServicerContext[Any, Any]

# Concurrent verifications, or redemptions, that share a transaction at most (see group_commit).
GATEWAY_BATCH = 64
# Successful verifications answered whose counters are not written yet, at most: what a crash can lose of
# the counters (verifications, last verified at), which are statistics (the number watch, the audit report)
# that nothing decides on. Failures are durable before their answer.
VERIFIED_BACKLOG = 1024
# How long those counters are held to gather a batch: at 1,000 verifications per second, 50 per commit.
VERIFIED_LINGER_S = 0.05
# Those counters in one statement at most: each commit costs about as much as moving 60 numbers' counters.
VERIFIED_BATCH = 256
MAX_HOLDER_NAME = 200
MAX_EXTERNAL_IDS = 20
MAX_REASON = 500
_PHONE = re.compile(r"\+?[0-9 ()\-]{3,32}")
_NAMESPACE = re.compile(r"[a-z0-9][a-z0-9:._\-]{0,63}")
_NAMESPACE_HINT = "must be lower-case letters, digits and : . _ -"

# Every verdict has its reason on the wire, named alike.
VERIFY_REASON = {
    verdict: customer_ids_pb2.VerificationReason.Value(f"VERIFICATION_REASON_{verdict.value}")
    for verdict in Verdict
}


def _now() -> datetime:
    return datetime.now(UTC)


class CustomerIdsServicer(DynamicCodesRpcs, customer_ids_pb2_grpc.CustomerIdsServicer):
    def __init__(
        self,
        store: SqlCustomerStore,
        numbering: Numbering,
        dynamic: SqlDynamicCodeStore,
        guard: FailureGuard,
        verifications: SqlVerificationStore,
        redemptions: SqlRedemptionStore,
        issuance: SqlIssuanceStore,
        writers: Writers,
        readers: Writers,
        local_reads: LocalReads | None = None,
    ) -> None:
        self._store = store
        self._numbering = numbering
        self._dynamic = dynamic
        self._guard = guard
        self._holders = HolderCipher(dict(numbering.keys.keys))
        # The gateway's writes run in batches of concurrent calls on the database's writer threads.
        self._verifications: GroupCommit[Presented, Verification] = GroupCommit(
            verifications.verify_many, limit=GATEWAY_BATCH, writers=writers
        )
        # On SQLite a verification is first read on the event loop, each call on its own (batching the calls
        # of one turn of the loop saved statements but cost each call a wait for the next turn: 0.55-0.61 of
        # the echo at 64 in flight against 0.58-0.62 read at once, at the same CPU); a success is answered
        # from that read and its counters written after the answer. Anything else is decided again by the
        # write above.
        self._local_reads = local_reads
        self._verified: AfterTheAnswer[Verified] = AfterTheAnswer(
            verifications.count_verified,
            limit=VERIFIED_BATCH,
            writers=writers,
            backlog=VERIFIED_BACKLOG,
            linger=VERIFIED_LINGER_S,
            what="counters of successful verifications",
        )
        self._redemptions = GroupCommit(redemptions.redeem_many, limit=GATEWAY_BATCH, writers=writers)
        self._issues: GroupCommit[Issuance, Issued] = GroupCommit(
            issuance.issue_many, limit=GATEWAY_BATCH, writers=writers
        )
        # Look-ups of customers (GetCustomer, ResolveExternalId) are read in batches on reader threads.
        self._lookups: GroupCommit[CustomerLookup, StoredCustomer] = GroupCommit(
            store.get_many, limit=GATEWAY_BATCH, writers=readers
        )
        # IssueDynamicCode reads what decides it (status, enrolment) in batches on the reader threads too.
        self._code_issues = GroupCommit(dynamic.enrolments_to_issue, limit=GATEWAY_BATCH, writers=readers)

    async def flush(self) -> None:
        """Write the counters of the verifications answered so far (at shutdown, before the writers stop)."""
        await self._verified.flush()

    # -- validation helpers ---------------------------------------------------------------------------

    def _scheme_of(self, issuer: str) -> Any:
        return self._numbering.scheme(issuer)

    def _message(self, stored: StoredCustomer, *, with_holder: bool = False) -> customer_ids_pb2.Customer:
        holder = None
        if with_holder and stored.holder_ciphertext is not None and stored.holder_key_version is not None:
            holder = self._holders.decrypt(
                stored.holder_ciphertext, stored.customer.customer_id, stored.holder_key_version
            )
        scheme = self._scheme_of(stored.customer.primary.issuer)
        return messages.customer(stored.customer, scheme, holder)

    # -- RPCs -----------------------------------------------------------------------------------------

    async def IssueCustomerId(
        self, request: customer_ids_pb2.IssueCustomerIdRequest, context: Context
    ) -> customer_ids_pb2.IssueCustomerIdResponse:
        check = Checker()
        check.request_id(request.request_id)
        check.text(request.issuer, "issuer", max_length=32)
        scheme = self._numbering.scheme(request.issuer)
        if request.issuer and scheme is None and not check.violations:
            check.fail("issuer", "is not a configured issuer")
        prefix = ""
        if scheme is not None:
            try:
                prefix = scheme.prefix(request.merchant_part)
            except ValueError:
                check.fail("merchant_part", f"must be {scheme.merchant_digits} digits for this issuer")
        check.text(request.holder.name, "holder.name", max_length=MAX_HOLDER_NAME)
        check.text(
            request.holder.phone,
            "holder.phone",
            max_length=32,
            pattern=_PHONE,
            pattern_hint="is not a phone number",
        )
        refs = self._external_ids(check, request.external_ids)
        check.done()
        assert scheme is not None
        holder = Holder(name=request.holder.name, phone=request.holder.phone)
        customer_id = "cus_" + secrets.token_hex(12)
        version = self._numbering.keys.current
        new = NewCustomer(
            customer_id=customer_id,
            issuer=scheme.issuer,
            prefix=prefix,
            holder_ciphertext=self._holders.encrypt(holder, customer_id, version) if holder else None,
            holder_key_version=version if holder else None,
            external_ids=refs,
        )
        issued = await self._issues.submit(
            Issuance(
                new,
                make_number=lambda p, c: self._numbering.make_number(scheme, p, c),
                request_id=request.request_id,
                fingerprint=fingerprint(request),
                actor=current_principal().key_id,
                now=_now(),
            )
        )
        return customer_ids_pb2.IssueCustomerIdResponse(
            customer=self._message(issued.stored), replayed=issued.replayed
        )

    def _external_ids(self, check: Checker, ids: Any, *, field: str = "external_ids") -> list[ExternalRef]:
        """Validate external ids; ``field`` names a list (``external_ids[i]``) or one message."""
        if len(ids) > MAX_EXTERNAL_IDS:
            check.fail(field, f"must hold at most {MAX_EXTERNAL_IDS} ids")
            return []
        refs: list[ExternalRef] = []
        for i, ref in enumerate(ids):
            path = f"{field}[{i}]" if field == "external_ids" else field
            check.text(
                ref.namespace,
                f"{path}.namespace",
                required=True,
                max_length=64,
                pattern=_NAMESPACE,
                pattern_hint=_NAMESPACE_HINT,
            )
            check.text(ref.value, f"{path}.value", required=True, max_length=256)
            item = ExternalRef(ref.namespace, ref.value)
            if item in refs:
                check.fail(path, "is listed twice")
            refs.append(item)
        return refs

    async def VerifyCustomerId(
        self, request: customer_ids_pb2.VerifyCustomerIdRequest, context: Context
    ) -> customer_ids_pb2.VerifyCustomerIdResponse:
        check = Checker()
        check.text(request.number, "number", required=True, max_length=MAX_NUMBER_INPUT)
        check.text(request.merchant_id, "merchant_id", max_length=64)
        check.check(
            request.channel in messages.CHANNEL_NAMES or request.channel == 0,
            "channel",
            "is not a known channel",
        )
        check.done()
        caller = current_principal().key_id
        now = _now()
        self._guard.check(caller, now)
        recognised = self._numbering.recognise(request.number)
        scheme = recognised.scheme
        if recognised.parsed is None or scheme is None:
            assert recognised.problem is not None
            presented = Presented(request.number, caller, problem=BY_PROBLEM[recognised.problem])
        else:
            presented = Presented(
                recognised.parsed.number,
                caller,
                merchant_id=request.merchant_id,
                channel=messages.CHANNEL_NAMES.get(request.channel, ""),
            )
        answer = None
        # A number the event loop's read found not valid is decided, counted and audited even if its caller
        # leaves first: a valid one was answered at once, so a DEADLINE_EXCEEDED would tell the caller.
        guessed = False
        if presented.problem is None and self._local_reads is not None:
            read = self._local_reads.verdicts((presented,))[0]
            if read is not None and read.verdict is Verdict.OK:
                answer = read
                await self._verified.post(Verified(presented.number, now))
            guessed = read is not None and read.verdict is not Verdict.OK
        if answer is None:  # decided again, counted and audited, durably, before the answer
            learns = self._guard.learns(caller)
            answer = await self._verifications.submit(presented, detached=guessed, then=learns)
        if answer.refused:
            assert answer.refused_until is not None
            raise refusal(answer.refused_until, _now())
        if answer.verdict in GUESSES:  # counted in the batch
            await self._guard.observe(VERIFY_METHOD)
        reason = VERIFY_REASON[answer.verdict]
        if presented.problem is not None:
            return customer_ids_pb2.VerifyCustomerIdResponse(valid=False, reason=reason)
        assert scheme is not None
        number = presented.number
        stored = answer.number
        if stored is None:
            return customer_ids_pb2.VerifyCustomerIdResponse(
                valid=False,
                reason=reason,
                normalized_number=number,
                display=scheme.display(number),
                issuer=scheme.issuer,
            )
        return customer_ids_pb2.VerifyCustomerIdResponse(
            valid=answer.verdict is Verdict.OK,
            reason=reason,
            status=messages.STATUS_TO_PROTO[stored.status],
            normalized_number=number,
            display=scheme.display(number),
            kind=messages.KIND_TO_PROTO[stored.kind],
            customer_id=answer.customer_id,
            issuer=stored.issuer,
            successor_number=stored.successor_number,
            primary_number=stored.primary_number,
        )

    @guarded
    async def GetCustomer(
        self, request: customer_ids_pb2.GetCustomerRequest, context: Context
    ) -> customer_ids_pb2.GetCustomerResponse:
        check = Checker()
        selector = request.customer.WhichOneof("selector")
        number = customer_id = None
        external = None
        if selector is None:
            check.fail("customer", "must name a customer by customer_id, number or external_id")
        elif selector == "customer_id":
            check.text(request.customer.customer_id, "customer.customer_id", required=True, max_length=32)
            customer_id = request.customer.customer_id
        elif selector == "number":
            number = self._number_field(check, request.customer.number, "customer.number", required=True)
        else:
            refs = self._external_ids(check, [request.customer.external_id], field="customer.external_id")
            external = refs[0] if refs else None
        check.done()
        stored = await self._lookups.submit(CustomerLookup(customer_id, number, external))
        # Holder details go to admins only; others get the customer without them, as the contract says.
        with_holder = request.include_holder and Role.ADMIN in current_principal().roles
        return customer_ids_pb2.GetCustomerResponse(customer=self._message(stored, with_holder=with_holder))

    async def ListCustomers(
        self, request: customer_ids_pb2.ListCustomersRequest, context: Context
    ) -> customer_ids_pb2.ListCustomersResponse:
        check = Checker()
        limit = check.page_size(request.page_size)
        status = None
        if request.status and check.check(
            request.status in messages.STATUS_FROM_PROTO, "status", "is not a known status"
        ):
            status = messages.STATUS_FROM_PROTO[request.status]
        check.text(request.issuer, "issuer", max_length=32)
        after_time, before_time = check.time_range(request, "created_after", "created_before")
        query = "customers:" + fingerprint(
            customer_ids_pb2.ListCustomersRequest(
                status=request.status,
                issuer=request.issuer,
                created_after=request.created_after,
                created_before=request.created_before,
            )
        )
        after = check.page_token(request.page_token, query)
        check.done()
        stored, cursor = await asyncio.to_thread(
            self._store.list,
            status=status,
            issuer=request.issuer or None,
            created_after=after_time,
            created_before=before_time,
            limit=limit,
            after=after,
        )
        return customer_ids_pb2.ListCustomersResponse(
            customers=[self._message(s) for s in stored], next_page_token=make_page_token(cursor, query)
        )

    async def _transition(self, request: Any, action: Transition) -> tuple[customer_ids_pb2.Customer, str]:
        check = Checker()
        check.request_id(request.request_id)
        number = self._number_field(check, request.number, "number", required=True)
        check.text(request.reason, "reason", required=True, max_length=MAX_REASON)
        check.done()
        assert number is not None
        scheme = self._numbering.recognise(number).scheme
        assert scheme is not None
        stored, previous, _ = await asyncio.to_thread(
            self._store.transition,
            number,
            action,
            reason=request.reason,
            request_id=request.request_id,
            fingerprint=fingerprint(request),
            actor=current_principal().key_id,
            now=_now(),
            make_number=lambda p, c: self._numbering.make_number(scheme, p, c),
        )
        return self._message(stored), previous

    @guarded
    async def SuspendCustomerId(
        self, request: customer_ids_pb2.SuspendCustomerIdRequest, context: Context
    ) -> customer_ids_pb2.SuspendCustomerIdResponse:
        customer, _ = await self._transition(request, Transition.SUSPEND)
        return customer_ids_pb2.SuspendCustomerIdResponse(customer=customer)

    @guarded
    async def ReactivateCustomerId(
        self, request: customer_ids_pb2.ReactivateCustomerIdRequest, context: Context
    ) -> customer_ids_pb2.ReactivateCustomerIdResponse:
        customer, _ = await self._transition(request, Transition.REACTIVATE)
        return customer_ids_pb2.ReactivateCustomerIdResponse(customer=customer)

    @guarded
    async def RevokeCustomerId(
        self, request: customer_ids_pb2.RevokeCustomerIdRequest, context: Context
    ) -> customer_ids_pb2.RevokeCustomerIdResponse:
        customer, _ = await self._transition(request, Transition.REVOKE)
        return customer_ids_pb2.RevokeCustomerIdResponse(customer=customer)

    @guarded
    async def RotateCustomerId(
        self, request: customer_ids_pb2.RotateCustomerIdRequest, context: Context
    ) -> customer_ids_pb2.RotateCustomerIdResponse:
        customer, previous = await self._transition(request, Transition.ROTATE)
        return customer_ids_pb2.RotateCustomerIdResponse(customer=customer, previous_number=previous)

    @guarded
    async def IssueSubId(
        self, request: customer_ids_pb2.IssueSubIdRequest, context: Context
    ) -> customer_ids_pb2.IssueSubIdResponse:
        check = Checker()
        check.request_id(request.request_id)
        primary = self._number_field(check, request.primary_number, "primary_number", required=True)
        check.text(request.scope.merchant_id, "scope.merchant_id", max_length=64)
        check.check(
            request.scope.channel in messages.CHANNEL_NAMES or request.scope.channel == 0,
            "scope.channel",
            "is not a known channel",
        )
        check.text(request.label, "label", max_length=100)
        check.done()
        assert primary is not None
        scheme = self._numbering.recognise(primary).scheme
        assert scheme is not None
        number, customer_id, _ = await asyncio.to_thread(
            self._store.issue_sub,
            primary,
            merchant_id=request.scope.merchant_id,
            channel=messages.CHANNEL_NAMES.get(request.scope.channel, ""),
            label=request.label,
            request_id=request.request_id,
            fingerprint=fingerprint(request),
            actor=current_principal().key_id,
            now=_now(),
            make_number=lambda p, c: self._numbering.make_number(scheme, p, c),
        )
        return customer_ids_pb2.IssueSubIdResponse(
            sub_number=messages.customer_number(number, scheme), customer_id=customer_id
        )

    @guarded
    async def LinkExternalId(
        self, request: customer_ids_pb2.LinkExternalIdRequest, context: Context
    ) -> customer_ids_pb2.LinkExternalIdResponse:
        check = Checker()
        check.request_id(request.request_id)
        customer_id, number = self._customer_or_number(check, request.customer)
        refs = self._external_ids(check, [request.external_id], field="external_id")
        check.done()
        linked_to, replayed = await asyncio.to_thread(
            self._store.link_external,
            refs[0],
            customer_id=customer_id,
            number=number,
            request_id=request.request_id,
            fingerprint=fingerprint(request),
            actor=current_principal().key_id,
            now=_now(),
        )
        return customer_ids_pb2.LinkExternalIdResponse(
            customer_id=linked_to, external_id=request.external_id, replayed=replayed
        )

    @guarded
    async def ResolveExternalId(
        self, request: customer_ids_pb2.ResolveExternalIdRequest, context: Context
    ) -> customer_ids_pb2.ResolveExternalIdResponse:
        check = Checker()
        query = request.WhichOneof("query")
        customer_id = number = None
        external = None
        if query is None:
            check.fail("query", "must be an external_id, a number or a customer_id")
        elif query == "external_id":
            refs = self._external_ids(check, [request.external_id], field="external_id")
            external = refs[0] if refs else None
        elif query == "number":
            number = self._number_field(check, request.number, "number", required=True)
        else:
            check.text(request.customer_id, "customer_id", required=True, max_length=32)
            customer_id = request.customer_id
        check.text(
            request.namespace, "namespace", max_length=64, pattern=_NAMESPACE, pattern_hint=_NAMESPACE_HINT
        )
        check.done()
        stored = await self._lookups.submit(CustomerLookup(customer_id, number, external))
        found = stored.customer
        return customer_ids_pb2.ResolveExternalIdResponse(
            customer_id=found.customer_id,
            primary_number=found.primary.number,
            external_ids=[
                common_pb2.ExternalId(namespace=e.namespace, value=e.value)
                for e in found.external_ids
                if not request.namespace or e.namespace == request.namespace
            ],
        )

    def _customer_or_number(
        self, check: Checker, selector: common_pb2.CustomerSelector
    ) -> tuple[str | None, str | None]:
        """A customer named by id or number (the forms a link can be made from)."""
        which = selector.WhichOneof("selector")
        if which == "customer_id":
            check.text(selector.customer_id, "customer.customer_id", required=True, max_length=32)
            return selector.customer_id, None
        if which == "number":
            return None, self._number_field(check, selector.number, "customer.number", required=True)
        check.fail("customer", "must name a customer by customer_id or number")
        return None, None
