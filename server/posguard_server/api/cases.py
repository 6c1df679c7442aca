"""The ``posguard.v1.Cases`` service: the review queue analysts work.

Cases are opened elsewhere (scoring, the number watch); here they are listed, shown, assigned and resolved.
Resolving a transaction case records its outcome as ReportOutcome does, and resolving a number watch case
with ROTATE rotates the number as RotateCustomerId does, each in the case's own unit of work (see
``store.cases``).
"""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime
from typing import Any

from grpc import aio

from posguard.v1 import cases_pb2, cases_pb2_grpc, common_pb2, risk_pb2
from posguard_server.api import customer_messages as messages
from posguard_server.api.convert import timestamp
from posguard_server.api.pipeline import current_principal
from posguard_server.api.risk import DECISION_TO_PROTO, OUTCOME_TO_PROTO
from posguard_server.api.validation import Checker, fingerprint, make_page_token
from posguard_server.domain.cases import (
    ASSIGNEE_MAX,
    CASE_ID_LENGTH,
    Case,
    CaseFilter,
    CaseKind,
    CaseStatus,
    Resolution,
)
from posguard_server.domain.customers import mask
from posguard_server.domain.numbering import Numbering
from posguard_server.domain.risk import StoredReason
from posguard_server.store.cases import CaseTransactionView, SqlCaseStore
from posguard_server.store.customers import MakeNumber
from posguard_server.store.risk_tables import OUTCOME_NOTE_MAX

Context = aio.ServicerContext[Any, Any]

KIND_TO_PROTO: dict[CaseKind, cases_pb2.CaseKind.ValueType] = {
    CaseKind.TRANSACTION: cases_pb2.CASE_KIND_TRANSACTION,
    CaseKind.NUMBER_WATCH: cases_pb2.CASE_KIND_NUMBER_WATCH,
}
STATUS_TO_PROTO: dict[CaseStatus, cases_pb2.CaseStatus.ValueType] = {
    CaseStatus.OPEN: cases_pb2.CASE_STATUS_OPEN,
    CaseStatus.ASSIGNED: cases_pb2.CASE_STATUS_ASSIGNED,
    CaseStatus.RESOLVED: cases_pb2.CASE_STATUS_RESOLVED,
}
RESOLUTION_TO_PROTO: dict[Resolution, cases_pb2.CaseResolution.ValueType] = {
    Resolution.FRAUD: cases_pb2.CASE_RESOLUTION_FRAUD,
    Resolution.LEGITIMATE: cases_pb2.CASE_RESOLUTION_LEGITIMATE,
    Resolution.ROTATE: cases_pb2.CASE_RESOLUTION_ROTATE,
    Resolution.DISMISS: cases_pb2.CASE_RESOLUTION_DISMISS,
}
KIND_FROM_PROTO = {v: k for k, v in KIND_TO_PROTO.items()}
STATUS_FROM_PROTO = {v: k for k, v in STATUS_TO_PROTO.items()}
RESOLUTION_FROM_PROTO = {v: k for k, v in RESOLUTION_TO_PROTO.items()}
CHANNEL_TO_PROTO = {name: value for value, name in messages.CHANNEL_NAMES.items()}

_REASON_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
# Control characters a note for people may hold: line breaks and tabs (as ReportOutcome's note).
_NOTE_WHITESPACE = str.maketrans("", "", "\n\r\t")


def _now() -> datetime:
    return datetime.now(UTC)


def _reasons(reasons: tuple[StoredReason, ...]) -> list[risk_pb2.Reason]:
    return [risk_pb2.Reason(code=r.code, message=r.message, weight=r.weight) for r in reasons]


def case_message(case: Case) -> cases_pb2.Case:
    return cases_pb2.Case(
        case_id=case.case_id,
        kind=KIND_TO_PROTO[case.kind],
        status=STATUS_TO_PROTO[case.status],
        customer_id=case.customer_id,
        transaction_id=case.transaction_id,
        masked_number=mask(case.number) if case.number else "",
        decision=DECISION_TO_PROTO[case.decision] if case.decision else risk_pb2.DECISION_UNSPECIFIED,
        risk_score=case.risk_score,
        reasons=_reasons(case.reasons),
        opened_at=timestamp(case.opened_at),
        assignee=case.assignee,
        assigned_at=timestamp(case.assigned_at),
        resolution=(
            RESOLUTION_TO_PROTO[case.resolution] if case.resolution else cases_pb2.CASE_RESOLUTION_UNSPECIFIED
        ),
        note=case.note,
        resolved_at=timestamp(case.resolved_at),
        resolved_by=case.resolved_by,
    )


def _transaction(view: CaseTransactionView) -> cases_pb2.CaseTransaction:
    return cases_pb2.CaseTransaction(
        transaction_id=view.transaction_id,
        event_time=timestamp(view.event_time),
        amount=common_pb2.Money(amount_minor=view.amount_minor, currency=view.currency),
        merchant_id=view.merchant_id,
        terminal_id=view.terminal_id,
        mcc=view.mcc,
        channel=CHANNEL_TO_PROTO.get(view.channel.value, common_pb2.CHANNEL_UNSPECIFIED),
        decision=DECISION_TO_PROTO[view.decision] if view.decision else risk_pb2.DECISION_UNSPECIFIED,
        risk_score=view.risk_score,
        reasons=_reasons(view.reasons),
        outcome=OUTCOME_TO_PROTO[view.outcome] if view.outcome else risk_pb2.OUTCOME_UNSPECIFIED,
    )


class CasesServicer(cases_pb2_grpc.CasesServicer):
    def __init__(self, store: SqlCaseStore, numbering: Numbering) -> None:
        self._store = store
        self._numbering = numbering

    async def ListCases(
        self, request: cases_pb2.ListCasesRequest, context: Context
    ) -> cases_pb2.ListCasesResponse:
        check = Checker()
        status = kind = None
        if request.status != cases_pb2.CASE_STATUS_UNSPECIFIED and check.check(
            request.status in STATUS_FROM_PROTO, "status", "is not a known case status"
        ):
            status = STATUS_FROM_PROTO[request.status]
        if request.kind != cases_pb2.CASE_KIND_UNSPECIFIED and check.check(
            request.kind in KIND_FROM_PROTO, "kind", "is not a known case kind"
        ):
            kind = KIND_FROM_PROTO[request.kind]
        check.text(request.assignee, "assignee", max_length=ASSIGNEE_MAX)
        check.text(
            request.reason,
            "reason",
            max_length=64,
            pattern=_REASON_CODE,
            pattern_hint="must be a reason code: upper-case letters, digits and _",
        )
        after_time, before_time = check.time_range(request, "opened_after", "opened_before")
        limit = check.page_size(request.page_size)
        query = "cases:" + json.dumps(
            [
                request.status,
                request.kind,
                request.assignee,
                request.reason,
                after_time.isoformat() if after_time else "",
                before_time.isoformat() if before_time else "",
            ],
            separators=(",", ":"),
        )
        after = check.page_token(request.page_token, query)
        check.done()
        where = CaseFilter(
            status=status,
            kind=kind,
            assignee=request.assignee,
            reason=request.reason,
            opened_after=after_time,
            opened_before=before_time,
        )
        cases, cursor = await asyncio.to_thread(self._store.list_cases, where, limit=limit, after=after)
        return cases_pb2.ListCasesResponse(
            cases=[case_message(c) for c in cases], next_page_token=make_page_token(cursor, query)
        )

    async def GetCase(self, request: cases_pb2.GetCaseRequest, context: Context) -> cases_pb2.GetCaseResponse:
        check = Checker()
        check.text(request.case_id, "case_id", required=True, max_length=CASE_ID_LENGTH)
        check.done()
        detail = await asyncio.to_thread(self._store.get, request.case_id)
        return cases_pb2.GetCaseResponse(
            case=case_message(detail.case),
            transaction=_transaction(detail.transaction) if detail.transaction is not None else None,
            recent_transactions=[_transaction(t) for t in detail.recent],
        )

    async def AssignCase(
        self, request: cases_pb2.AssignCaseRequest, context: Context
    ) -> cases_pb2.AssignCaseResponse:
        check = Checker()
        check.request_id(request.request_id)
        check.text(request.case_id, "case_id", required=True, max_length=CASE_ID_LENGTH)
        check.text(request.assignee, "assignee", max_length=ASSIGNEE_MAX)
        check.done()
        actor = current_principal().key_id
        case = await asyncio.to_thread(
            self._store.assign,
            request.case_id,
            request.assignee or actor,
            request_id=request.request_id,
            fingerprint=fingerprint(request),
            actor=actor,
            now=_now(),
        )
        return cases_pb2.AssignCaseResponse(case=case_message(case))

    async def ResolveCase(
        self, request: cases_pb2.ResolveCaseRequest, context: Context
    ) -> cases_pb2.ResolveCaseResponse:
        check = Checker()
        check.request_id(request.request_id)
        check.text(request.case_id, "case_id", required=True, max_length=CASE_ID_LENGTH)
        resolution = RESOLUTION_FROM_PROTO.get(request.resolution)
        check.check(resolution is not None, "resolution", "must be FRAUD, LEGITIMATE, ROTATE or DISMISS")
        if len(request.note) > OUTCOME_NOTE_MAX:
            check.fail("note", f"must be at most {OUTCOME_NOTE_MAX} characters")
        elif not request.note.translate(_NOTE_WHITESPACE).isprintable():
            check.fail("note", "must not contain control characters other than line breaks and tabs")
        check.done()
        assert resolution is not None
        case, replayed = await asyncio.to_thread(
            self._store.resolve,
            request.case_id,
            resolution,
            request.note,
            request_id=request.request_id,
            fingerprint=fingerprint(request),
            actor=current_principal().key_id,
            now=_now(),
            make_number_for=self._successor_maker,
        )
        return cases_pb2.ResolveCaseResponse(case=case_message(case), replayed=replayed)

    def _successor_maker(self, number: str) -> MakeNumber:
        """How a rotated number's successor is made: under the number's own scheme, as RotateCustomerId."""
        scheme = self._numbering.recognise(number).scheme
        assert scheme is not None  # a number that was issued is of a scheme this server knows
        return lambda prefix, counter: self._numbering.make_number(scheme, prefix, counter)
