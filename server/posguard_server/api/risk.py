"""The ``posguard.v1.Risk`` service: scoring transactions, taking outcome labels, showing risk profiles.

Every request is validated in full before anything is touched (each bad field named, see ``validation``).
Then the scoring service (``services.scoring``) resolves the customer from what the transaction names (a
number, a one-time dynamic code, or an external id), checks it may pay, scores, stores and answers, all in
one database transaction; this module only translates between the wire and that service.

A customer who is found but may not pay (a suspended, revoked or rotated number, a sub number outside its
scope or whose primary is blocked, a used or expired dynamic code) is an answer, not an error: a decline by
rule.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import Message
from grpc import aio

from posguard.v1 import common_pb2, risk_pb2, risk_pb2_grpc
from posguard_server.api import customer_messages as messages
from posguard_server.api.convert import timestamp
from posguard_server.api.dynamic_codes import MAX_CODE_INPUT, MAX_MERCHANT, MAX_NUMBER_INPUT
from posguard_server.api.enumeration import FailureGuard, guarded
from posguard_server.api.errors import status_for
from posguard_server.api.group_commit import GroupCommit, Writers
from posguard_server.api.metrics import Metrics
from posguard_server.api.pipeline import annotate_call, current_principal, stream_work
from posguard_server.api.stream_batches import StreamBatches
from posguard_server.api.validation import Checker, fingerprint
from posguard_server.domain.currencies import is_money
from posguard_server.domain.customers import ExternalRef, mask
from posguard_server.domain.dynamic_codes import parse_code
from posguard_server.domain.enumeration import MISS_REASONS
from posguard_server.domain.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PosguardError,
    Unauthenticated,
    Unavailable,
)
from posguard_server.domain.numbering import Numbering
from posguard_server.domain.risk import (
    Decision,
    ModelScope,
    Outcome,
    StoredTransaction,
    event_time_refusal,
)
from posguard_server.scoring import RiskEngine, TransactionInput
from posguard_server.services.scoring import Payer, ScoreCall, Scoring, ScoringService
from posguard_server.store.customers import SqlCustomerStore
from posguard_server.store.risk_tables import OUTCOME_NOTE_MAX, TERMINAL_ID_MAX, TRANSACTION_ID_MAX
from posguard_server.store.scoring_writes import Scored

Context = aio.ServicerContext[Any, Any]

MAX_AMOUNT_MINOR = 10**15
MAX_CUSTOMER_ID = 32
MAX_NAMESPACE = 64
MAX_EXTERNAL_VALUE = 256
_MCC = re.compile(r"[0-9]{4}")
_NAMESPACE = re.compile(r"[a-z0-9][a-z0-9:._\-]{0,63}")  # as CustomerIds checks external ids
_NAMESPACE_HINT = "must be lower-case letters, digits and : . _ -"
# Control characters a note for people may hold: line breaks and tabs.
_NOTE_WHITESPACE = str.maketrans("", "", "\n\r\t")
_STREAM_METHOD = "/posguard.v1.Risk/ScoreTransactions"
_SCORE_METHOD = "ScoreTransaction"  # in the audit of a miss, for the stream's items too
# Most transactions of a ScoreTransactions stream committed together (see stream_batches), and most
# concurrent ScoreTransaction calls (see group_commit).
STREAM_BATCH = 64
COMMIT_BATCH = 64
# Errors of the whole call, not of one item: they end a ScoreTransactions stream. A key refused for guessing
# (RESOURCE_EXHAUSTED) is refused item by item, at the cost of a dictionary lookup: the answers of the items
# before it in the batch, stored already, still go out.
_CALL_ERRORS = (Unauthenticated, PermissionDenied, DeadlineExceeded, Unavailable)

DECISION_TO_PROTO: dict[Decision, risk_pb2.Decision.ValueType] = {
    Decision.APPROVE: risk_pb2.DECISION_APPROVE,
    Decision.REVIEW: risk_pb2.DECISION_REVIEW,
    Decision.DECLINE: risk_pb2.DECISION_DECLINE,
}
SCOPE_TO_PROTO: dict[ModelScope, risk_pb2.ModelScope.ValueType] = {
    ModelScope.CUSTOMER: risk_pb2.MODEL_SCOPE_CUSTOMER,
    ModelScope.GLOBAL: risk_pb2.MODEL_SCOPE_GLOBAL,
    ModelScope.NONE: risk_pb2.MODEL_SCOPE_NONE,
}
OUTCOME_TO_PROTO: dict[Outcome, risk_pb2.Outcome.ValueType] = {
    Outcome.FRAUD: risk_pb2.OUTCOME_FRAUD,
    Outcome.CHARGEBACK: risk_pb2.OUTCOME_CHARGEBACK,
    Outcome.LEGITIMATE: risk_pb2.OUTCOME_LEGITIMATE,
}
OUTCOME_FROM_PROTO = {v: k for k, v in OUTCOME_TO_PROTO.items()}


def _now() -> datetime:
    return datetime.now(UTC)


# -- validation ---------------------------------------------------------------------------------------


def _time_field(
    check: Checker, message: Message, name: str, path: str, *, required: bool, now: datetime
) -> datetime | None:
    """A Timestamp field as aware UTC, within ``event_time_refusal``'s range; None if unset or bad."""
    value = check.timestamp(message, name, path)
    if value is None:  # unset, or noted as invalid
        if required and not message.HasField(name):
            check.fail(path, "is required")
        return None
    refusal = event_time_refusal(value, now)
    if refusal is not None:
        check.fail(path, refusal)
    return value


def _external_id(check: Checker, ref: common_pb2.ExternalId, path: str) -> ExternalRef:
    check.text(
        ref.namespace,
        f"{path}.namespace",
        required=True,
        max_length=MAX_NAMESPACE,
        pattern=_NAMESPACE,
        pattern_hint=_NAMESPACE_HINT,
    )
    check.text(ref.value, f"{path}.value", required=True, max_length=MAX_EXTERNAL_VALUE)
    return ExternalRef(ref.namespace, ref.value)


def _number(numbering: Numbering, check: Checker, value: str, path: str) -> str | None:
    """A customer number in canonical form; None (with a violation) when it is missing or not valid."""
    before = len(check.violations)
    check.text(value, path, required=True, max_length=MAX_NUMBER_INPUT)
    if len(check.violations) > before:
        return None
    recognised = numbering.recognise(value)
    if recognised.parsed is None:
        problem = recognised.problem.name.lower().replace("_", " ") if recognised.problem else "malformed"
        check.fail(path, f"is not a valid customer number ({problem})")
        return None
    return recognised.parsed.number


def _transaction_id(check: Checker, value: str, path: str) -> None:
    check.text(value, path, required=True, max_length=TRANSACTION_ID_MAX)


@dataclass(frozen=True, slots=True)
class _Checked:
    """A transaction that passed validation, ready to resolve and score."""

    txn: TransactionInput
    who: Payer
    request_id: str
    fingerprint: str


def _check_transaction(
    numbering: Numbering, check: Checker, txn: risk_pb2.Transaction, now: datetime
) -> tuple[Payer, TransactionInput | None]:
    """Validate a Transaction at ``transaction``; the input for the engine when nothing was wrong."""
    before = len(check.violations)
    p = "transaction"
    _transaction_id(check, txn.transaction_id, f"{p}.transaction_id")
    which = txn.WhichOneof("customer")
    who = Payer()
    if which is None:
        check.fail(f"{p}.customer", "must name the customer by customer_number, dynamic_code or external_id")
    elif which == "customer_number":
        who = Payer(number=_number(numbering, check, txn.customer_number, f"{p}.customer_number"))
    elif which == "dynamic_code":
        code_problems = len(check.violations)
        check.text(txn.dynamic_code, f"{p}.dynamic_code", required=True, max_length=MAX_CODE_INPUT)
        if len(check.violations) == code_problems and parse_code(txn.dynamic_code) is None:
            check.fail(f"{p}.dynamic_code", "is not a dynamic code (18 digits)")
        who = Payer(code=txn.dynamic_code)
    else:
        who = Payer(external=_external_id(check, txn.external_id, f"{p}.external_id"))
    if not txn.HasField("amount"):
        check.fail(f"{p}.amount", "is required")
    else:
        amount = txn.amount.amount_minor
        if amount <= 0:
            check.fail(f"{p}.amount.amount_minor", "must be positive")
        elif amount > MAX_AMOUNT_MINOR:
            check.fail(f"{p}.amount.amount_minor", f"must be at most {MAX_AMOUNT_MINOR}")
        check.check(
            is_money(txn.amount.currency),
            f"{p}.amount.currency",
            "must be an active ISO 4217 currency code in upper case (e.g. CNY, USD, EUR)",
        )
    check.text(txn.merchant_id, f"{p}.merchant_id", required=True, max_length=MAX_MERCHANT)
    check.text(txn.terminal_id, f"{p}.terminal_id", max_length=TERMINAL_ID_MAX)
    check.text(txn.mcc, f"{p}.mcc", max_length=4, pattern=_MCC, pattern_hint="must be exactly 4 digits")
    event_time = _time_field(check, txn, "event_time", f"{p}.event_time", required=True, now=now)
    check.check(
        txn.channel in messages.CHANNEL_NAMES or txn.channel == common_pb2.CHANNEL_UNSPECIFIED,
        f"{p}.channel",
        "is not a known channel",
    )
    latitude = longitude = None
    if txn.HasField("location"):
        latitude, longitude = txn.location.latitude, txn.location.longitude
        check.check(
            math.isfinite(latitude) and -90 <= latitude <= 90,
            f"{p}.location.latitude",
            "must be a number from -90 to 90",
        )
        check.check(
            math.isfinite(longitude) and -180 <= longitude <= 180,
            f"{p}.location.longitude",
            "must be a number from -180 to 180",
        )
    if len(check.violations) > before or event_time is None:
        return who, None
    return who, TransactionInput(
        transaction_id=txn.transaction_id,
        amount_minor=txn.amount.amount_minor,
        currency=txn.amount.currency,
        merchant_id=txn.merchant_id,
        terminal_id=txn.terminal_id,
        mcc=txn.mcc,
        event_time=event_time,
        channel=messages.CHANNEL_NAMES.get(txn.channel, ""),
        latitude=latitude,
        longitude=longitude,
    )


# -- answers ------------------------------------------------------------------------------------------


def score_response(stored: StoredTransaction, replayed: bool) -> risk_pb2.ScoreTransactionResponse:
    answer = stored.answer
    if answer is None:  # the engine only returns scored transactions
        raise TypeError("a scored transaction has no stored answer")
    return risk_pb2.ScoreTransactionResponse(
        transaction_id=stored.transaction.transaction_id,
        customer_id=stored.transaction.customer_id,
        risk_score=answer.risk_score,
        decision=DECISION_TO_PROTO[answer.decision],
        reasons=[risk_pb2.Reason(code=r.code, message=r.message, weight=r.weight) for r in answer.reasons],
        model=risk_pb2.ModelInfo(
            scope=SCOPE_TO_PROTO[answer.model_scope],
            version=answer.model_version,
            history_size=answer.history_size,
            cold_start=answer.cold_start,
        ),
        replayed=replayed,
        scored_at=timestamp(answer.scored_at),
    )


def stream_error(error: Exception) -> common_pb2.StreamError:
    """The StreamError for one item: what a unary call would carry in its status, nothing internal."""
    if isinstance(error, PosguardError):
        violations = error.violations if isinstance(error, InvalidArgument) else ()
        return common_pb2.StreamError(
            code=error.kind.value,
            reason=error.reason,
            message=error.message,
            field_violations=[
                common_pb2.FieldViolation(field=v.field, description=v.description) for v in violations
            ],
        )
    status = status_for(error, _STREAM_METHOD)  # logs it under a reference; the text stays here
    return common_pb2.StreamError(code=status.code.name, reason=status.code.name, message=status.details)


# -- the servicer -------------------------------------------------------------------------------------


class RiskServicer(risk_pb2_grpc.RiskServicer):
    def __init__(
        self,
        engine: RiskEngine,
        scoring: ScoringService,
        store: SqlCustomerStore,
        numbering: Numbering,
        *,
        metrics: Metrics,
        guard: FailureGuard,
        writers: Writers,
    ) -> None:
        self._engine = engine
        self._scoring = scoring
        self._metrics = metrics
        self._guard = guard
        self._commits: GroupCommit[ScoreCall, Scoring] = GroupCommit(
            scoring.score_many, limit=COMMIT_BATCH, writers=writers
        )
        self._store = store
        self._numbering = numbering

    # -- scoring --------------------------------------------------------------------------------------

    def _check_score(
        self, request: risk_pb2.ScoreTransactionRequest | risk_pb2.ScoreTransactionsRequest
    ) -> _Checked:
        check = Checker()
        check.request_id(request.request_id, required=False)
        who, txn = Payer(), None
        if not request.HasField("transaction"):
            check.fail("transaction", "is required")
        else:
            who, txn = _check_transaction(self._numbering, check, request.transaction, _now())
        check.done()
        assert txn is not None
        # Without the request_id: the transaction's own, which a retry under any request_id must match.
        same = fingerprint(risk_pb2.ScoreTransactionRequest(transaction=request.transaction))
        return _Checked(txn, who, request.request_id, same)

    async def _score(self, checked: _Checked) -> risk_pb2.ScoreTransactionResponse:
        call = self._call(checked)
        stored, replayed = await self._outcome(call, await self._commits.submit(call))
        response = self._answered(stored, replayed)
        who = checked.who
        annotate_call(
            customer=mask(who.number) if who.number else response.customer_id,
            model_version=response.model.version,
        )
        return response

    def _answered(self, stored: StoredTransaction, replayed: bool) -> risk_pb2.ScoreTransactionResponse:
        """The answer to send; a new decision (not a replay) is also counted in the metrics."""
        response = score_response(stored, replayed)
        answer = stored.answer
        if not replayed and answer is not None:
            self._metrics.observe_score(
                answer.risk_score, answer.decision.value, answer.model_scope.value, answer.model_version
            )
        return response

    def _call(self, checked: _Checked) -> ScoreCall:
        """What the scoring service takes; a caller refused for guessing may not name another customer."""
        actor = current_principal().key_id  # whose request_id it is, and whose guesses count
        self._guard.check(actor, _now())
        return ScoreCall(checked.txn, checked.who, checked.request_id, checked.fingerprint, actor)

    async def _outcome(self, call: ScoreCall, scoring: Scoring) -> Scored:
        """The stored answer of a call, or its error; naming nobody (a guess) counts against the caller."""
        result = scoring.result
        if isinstance(result, NotFound) and result.reason in MISS_REASONS:
            raise await self._guard.missed(call.actor, _SCORE_METHOD, result)
        if isinstance(result, PosguardError):
            raise result
        return result

    async def ScoreTransaction(
        self, request: risk_pb2.ScoreTransactionRequest, context: Context
    ) -> risk_pb2.ScoreTransactionResponse:
        return await self._score(self._check_score(request))

    async def ScoreTransactions(
        self, request_iterator: AsyncIterator[risk_pb2.ScoreTransactionsRequest], context: Context
    ) -> AsyncIterator[risk_pb2.ScoreTransactionsResponse]:
        # In the order sent: history replays in event-time order, and a customer's profile must see each
        # transaction before the next. What arrives while a batch is scored forms the next batch, scored in
        # one database transaction (one commit for all of it). The stream holds an admission slot only while
        # a batch is scored: open and idle, or while its replies are sent, it takes none from other calls.
        index = 0
        async with StreamBatches(
            request_iterator, limit=STREAM_BATCH, key=lambda r: r.transaction.transaction_id
        ) as batches:
            while batch := await batches.next():
                with stream_work():
                    replies = await self._score_stream_batch(batch, index)
                for reply in replies:
                    yield reply
                index += len(batch)

    async def _score_stream_batch(
        self, batch: list[risk_pb2.ScoreTransactionsRequest], first_index: int
    ) -> list[risk_pb2.ScoreTransactionsResponse]:
        replies: list[risk_pb2.ScoreTransactionsResponse] = []
        ready: list[tuple[risk_pb2.ScoreTransactionsResponse, ScoreCall]] = []
        for offset, request in enumerate(batch):
            reply = risk_pb2.ScoreTransactionsResponse(
                index=first_index + offset, transaction_id=_safe_id(request)
            )
            replies.append(reply)
            try:
                ready.append((reply, self._call(self._check_score(request))))
            except _CALL_ERRORS:
                raise
            except Exception as error:  # one bad transaction does not end the stream
                reply.error.CopyFrom(stream_error(error))
        if not ready:
            return replies
        results: list[Scoring | Exception]
        try:
            results = await self._commits.submit_many([call for _, call in ready])
        except _CALL_ERRORS:
            raise
        except Exception as error:
            results = [error for _ in ready]
        for (reply, call), result in zip(ready, results, strict=True):
            try:
                if isinstance(result, Exception):
                    raise result
                reply.result.CopyFrom(self._answered(*await self._outcome(call, result)))
            except _CALL_ERRORS:
                raise
            except Exception as error:
                reply.error.CopyFrom(stream_error(error))
        return replies

    # -- outcomes and profiles ------------------------------------------------------------------------

    async def ReportOutcome(
        self, request: risk_pb2.ReportOutcomeRequest, context: Context
    ) -> risk_pb2.ReportOutcomeResponse:
        check = Checker()
        check.request_id(request.request_id)
        _transaction_id(check, request.transaction_id, "transaction_id")
        outcome = OUTCOME_FROM_PROTO.get(request.outcome)
        check.check(outcome is not None, "outcome", "must be FRAUD, CHARGEBACK or LEGITIMATE")
        reported_at = _time_field(check, request, "reported_at", "reported_at", required=False, now=_now())
        if len(request.note) > OUTCOME_NOTE_MAX:
            check.fail("note", f"must be at most {OUTCOME_NOTE_MAX} characters")
        elif not request.note.translate(_NOTE_WHITESPACE).isprintable():
            check.fail("note", "must not contain control characters other than line breaks and tabs")
        check.done()
        assert outcome is not None
        record, replayed = await asyncio.to_thread(
            self._engine.report_outcome,
            request.transaction_id,
            outcome.value,
            reported_at=reported_at,
            note=request.note,
            request_id=request.request_id,
            fingerprint=fingerprint(request),
            caller=current_principal().key_id,
        )
        return risk_pb2.ReportOutcomeResponse(
            transaction_id=record.transaction_id, outcome=OUTCOME_TO_PROTO[record.outcome], replayed=replayed
        )

    @guarded
    async def GetCustomerRiskProfile(
        self, request: risk_pb2.GetCustomerRiskProfileRequest, context: Context
    ) -> risk_pb2.GetCustomerRiskProfileResponse:
        check = Checker()
        selector = request.customer.WhichOneof("selector")
        customer_id = number = None
        external = None
        if selector is None:
            check.fail("customer", "must name a customer by customer_id, number or external_id")
        elif selector == "customer_id":
            check.text(
                request.customer.customer_id,
                "customer.customer_id",
                required=True,
                max_length=MAX_CUSTOMER_ID,
            )
            customer_id = request.customer.customer_id
        elif selector == "number":
            number = _number(self._numbering, check, request.customer.number, "customer.number")
        else:
            external = _external_id(check, request.customer.external_id, "customer.external_id")
        check.done()
        if customer_id is None:
            stored = await asyncio.to_thread(self._store.get, number=number, external=external)
            customer_id = stored.customer.customer_id
        view = await asyncio.to_thread(self._engine.profile, customer_id)  # NOT_FOUND for nobody
        typical = None
        if view.typical_amount_minor is not None:
            typical = common_pb2.Money(amount_minor=view.typical_amount_minor, currency=view.currency)
        return risk_pb2.GetCustomerRiskProfileResponse(
            customer_id=view.customer_id,
            transaction_count=view.transaction_count,
            first_seen=timestamp(view.first_seen),
            last_seen=timestamp(view.last_seen),
            typical_amount=typical,
            active_model=risk_pb2.ModelInfo(
                scope=SCOPE_TO_PROTO[ModelScope(view.active_scope)],
                version=view.active_version,
                history_size=view.history_size,
                cold_start=view.cold_start,
            ),
            failed_verifications=view.failed_verifications,
            dynamic_code_replays=view.dynamic_code_replays,
            declines=view.declines,
            reviews=view.reviews,
            distinct_merchants=view.distinct_merchants,
            distinct_terminals=view.distinct_terminals,
        )


def _safe_id(request: risk_pb2.ScoreTransactionsRequest) -> str:
    """The transaction id to echo in a stream response: as sent, unless it is too long or unprintable."""
    value = request.transaction.transaction_id
    return value if len(value) <= TRANSACTION_ID_MAX and value.isprintable() else ""
