"""Scoring transactions, the use case behind ScoreTransaction and ScoreTransactions: one unit of work.

The servicer validates a call and says whom the transaction names (a customer number, an external id or a
one-time dynamic code). Here, in one database transaction per batch, the customer is resolved, the
identifier is checked (a number that may not pay declines by rule), a dynamic code is redeemed, the engine
scores, and the answer and the profile update are stored. Nothing of a batch is kept unless all of it
commits: a score that fails spends no dynamic code, and the gateway's retry redeems it again.

Whom to lock is only known once the identifier is read, so that first read takes no lock and decides
nothing. The customers are then locked, all of a batch at once and in one order; what decides is read after
that: a number's status, a sub number's primary, an external id's link, a code's enrolment. A status change
(suspend, revoke, rotate) updates the customer row in its own transaction, so it either committed before the
lock (and the read after it sees the change) or waits for this batch to commit. On SQLite the writer lock
taken when the transaction begins serialises all of this anyway, so there the first read is the one that
decides and is not repeated.

Resolution is not shared with the CustomerIds use cases: VerifyCustomerId records every verification (a
failure also per caller, and audited), which scoring must not do, and RedeemDynamicCode keys a redemption by
its own request_id where scoring keys it by the transaction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from posguard.dynamic_codes import time_step
from posguard_server.domain.customers import CustomerNumber, ExternalRef, NumberKind, NumberStatus
from posguard_server.domain.dynamic_codes import PresentedCode, Reason, parse_code
from posguard_server.domain.enumeration import FailureLimit
from posguard_server.domain.errors import Aborted, AlreadyExists, InvalidArgument, NotFound, PosguardError
from posguard_server.domain.policy import Policy
from posguard_server.domain.risk import StoredTransaction
from posguard_server.scoring import (
    IdentityDecline,
    PolicyFacts,
    RiskEngine,
    ScoreRequest,
    Serving,
    TransactionInput,
    major_amount,
)
from posguard_server.store.dynamic_codes import Attempt, OpenKey, RedemptionAnswer
from posguard_server.store.scoring_writes import Scored, ScoreItem, ScoringUnit, SqlScoringStore

# How often a batch is run again after losing a race: a unique constraint (a code or a transaction id
# stored concurrently elsewhere), a profile written by another writer since it was read, or a link that
# moved between the first read and the lock. The re-run sees the winner.
_ATTEMPTS = 3
# The redemption a score makes is kept under this prefix and a hash of the transaction id and the code: a
# retry of the transaction (with any request_id) replays it, a retry with a corrected code is a new
# redemption (the refused one must not take the transaction id), and it never meets a RedeemDynamicCode
# request_id.
_REDEMPTION_KEY_PREFIX = "risk.score:"

# What a refused dynamic code whose customer is known declines with.
_CODE_DECLINES: dict[Reason, IdentityDecline] = {
    Reason.ALREADY_USED: IdentityDecline(
        "DYNAMIC_CODE_REPLAYED", "dynamic code was already used; a one-time code pays only once"
    ),
    Reason.EXPIRED: IdentityDecline("DYNAMIC_CODE_EXPIRED", "dynamic code has expired"),
}
_STATUS_DECLINES: dict[NumberStatus, IdentityDecline] = {
    NumberStatus.SUSPENDED: IdentityDecline("NUMBER_SUSPENDED", "customer number is suspended"),
    NumberStatus.REVOKED: IdentityDecline("NUMBER_REVOKED", "customer number is revoked"),
    NumberStatus.ROTATED: IdentityDecline(
        "NUMBER_ROTATED", "customer number was rotated and a successor number replaces it"
    ),
}


@dataclass(frozen=True, slots=True)
class Payer:
    """Whom a transaction names: exactly one of a canonical number, a dynamic code, an external id."""

    number: str | None = None
    code: str | None = None
    external: ExternalRef | None = None


@dataclass(frozen=True, slots=True)
class ScoreCall:
    """A validated ScoreTransaction: the transaction, whom it names, and its idempotency keys."""

    txn: TransactionInput
    payer: Payer
    request_id: str  # "" for none; the caller's own key (see store.idempotency)
    fingerprint: str
    actor: str  # the caller's key id: whose request_id it is, recorded with a dynamic code's redemption


@dataclass(frozen=True, slots=True)
class Scoring:
    """The answer to one call (or its refusal), and the redemption of its dynamic code when one was judged.

    The redemption lets the caller count guesses (codes that match nothing) against the caller's limit.
    """

    result: Scored | PosguardError
    redemption: RedemptionAnswer | None = None


class _LinkMoved(Exception):
    """A customer read before the lock is not the one read after it: run the batch again."""


@dataclass(slots=True)
class _Pending:
    """One call on its way through the batch."""

    call: ScoreCall
    customer: str = ""
    identity: IdentityDecline | None = None
    error: PosguardError | None = None
    replay: StoredTransaction | None = None
    code: PresentedCode | None = None
    redemption: RedemptionAnswer | None = None


class ScoringService:
    def __init__(
        self, engine: RiskEngine, store: SqlScoringStore, *, open_key: OpenKey, code_limit: FailureLimit
    ) -> None:
        self._engine = engine
        self._store = store
        self._open_key = open_key
        self._code_limit = code_limit  # wrong codes per enrolment from any key, as RedeemDynamicCode counts

    def score_many(self, calls: Sequence[ScoreCall]) -> list[Scoring]:
        """Resolve, check, redeem, score and store each call, in order, in one database transaction.

        One ``Scoring`` per call; a call that is refused (unknown number, idempotency conflict) carries its
        error and changes nothing, the others are stored. Errors of the whole batch raise (the database is
        unavailable, the deadline passed, a bug while scoring), and then nothing of it was kept.
        """
        serving = self._engine.models.serving()
        for attempt in range(_ATTEMPTS):
            try:
                with self._store.scoring_unit() as unit:
                    return self._score_in(unit, calls, serving)
            except (AlreadyExists, Aborted, _LinkMoved):
                if attempt == _ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _score_in(self, unit: ScoringUnit, calls: Sequence[ScoreCall], serving: Serving) -> list[Scoring]:
        now = datetime.now(UTC)
        payers = [c.payer for c in calls]
        codes = [_parsed(payer.code) for payer in payers]
        # The first reads, sent together (one round trip on PostgreSQL): the stored transactions and request
        # ids the calls name, and whom their numbers, external ids and codes name (read without a lock, so
        # they decide nothing: see the module's docstring). Retries and refused calls are read too.
        with unit.together():
            unit.load_earlier([c.txn.transaction_id for c in calls], [(c.actor, c.request_id) for c in calls])
            first_numbers = unit.numbers({payer.number for payer in payers if payer.number is not None})
            first_links = unit.externals({payer.external for payer in payers if payer.external is not None})
            first_owners = unit.enrolment_owners({code.handle for code in codes if code is not None})
        pending = [_first_look(unit, call, code) for call, code in zip(calls, codes, strict=True)]
        _refuse_conflicts_within(pending)
        todo = [p for p in pending if p.error is None and p.replay is None]
        numbers = {p.call.payer.number for p in todo if p.call.payer.number is not None}
        externals = {p.call.payer.external for p in todo if p.call.payer.external is not None}
        handles = {p.code.handle for p in todo if p.code is not None}
        number_owners = {n: owner for n, (_, owner) in first_numbers.get().items() if n in numbers}
        external_owners = {ref: owner for ref, owner in first_links.get().items() if ref in externals}
        code_owners = {handle: owner for handle, owner in first_owners.get().items() if handle in handles}
        replayed = {p.replay.transaction.customer_id for p in pending if p.replay is not None}
        whom = (
            replayed | set(number_owners.values()) | set(external_owners.values()) | set(code_owners.values())
        )
        # The lock and, under it, what decides, sent together. A unit that has held the write lock since it
        # began read it already.
        with unit.together():
            locking = unit.lock_customers(whom)
            if unit.locked_from_start:
                numbers_read, links_read = first_numbers, first_links
            else:
                numbers_read, links_read = unit.numbers(numbers), unit.externals(externals)
            primaries_read = unit.primaries(whom)
        locked = locking.get()
        stored_numbers, linked = numbers_read.get(), links_read.get()
        primaries = {
            customer: primary for customer, primary in primaries_read.get().items() if customer in locked
        }
        for p in todo:
            payer = p.call.payer
            try:
                if payer.number is not None:
                    found = stored_numbers.get(payer.number)
                    if found is not None and found[1] not in locked:
                        raise _LinkMoved  # a number issued since the first read: its customer is not locked
                    p.customer, p.identity = _by_number(payer.number, stored_numbers, primaries, p.call.txn)
                elif payer.external is not None:
                    p.customer = _linked(payer.external, linked, external_owners)
                    p.identity = _STATUS_DECLINES.get(primaries[p.customer].status)
                else:
                    self._redeem(unit, p, primaries, locked, now)
            except PosguardError as error:
                p.error = error
        policy = self._engine.policy.current() if self._engine.policy is not None else None
        facts = _policy_facts(unit, policy, todo, primaries, now) if policy is not None else {}
        items: list[ScoreItem] = []
        scored: list[_Pending] = []
        for p in pending:
            if p.error is not None:
                continue
            customer = p.replay.transaction.customer_id if p.replay is not None else p.customer
            request = ScoreRequest(
                p.call.txn,
                customer,
                p.identity,
                p.call.request_id,
                p.call.fingerprint,
                p.call.actor,
                facts.get(id(p)),
            )
            # Not caught per call: what fails here now (loading a customer's model) fails the whole batch,
            # so no redemption made above is kept without its transaction.
            items.append(self._engine.item(request, serving))
            scored.append(p)
        results = dict(
            zip((id(p) for p in scored), unit.score(items, now=now, finish=self._engine.finish), strict=True)
        )
        return [Scoring(p.error if p.error is not None else results[id(p)], p.redemption) for p in pending]

    def _redeem(
        self,
        unit: ScoringUnit,
        p: _Pending,
        primaries: dict[str, CustomerNumber],
        locked: set[str],
        now: datetime,
    ) -> None:
        """Redeem the code (its one use) as RedeemDynamicCode does, keyed by the transaction."""
        code, txn = p.code, p.call.txn
        assert code is not None
        redemption = f"{txn.transaction_id}\n{code.handle}{code.totp}"
        attempt = Attempt(
            request_id=_REDEMPTION_KEY_PREFIX + hashlib.sha256(redemption.encode()).hexdigest(),
            fingerprint=p.call.fingerprint,
            expected_number=None,
            merchant_id=txn.merchant_id,
            terminal_id=txn.terminal_id,
            amount=(txn.amount_minor, txn.currency),
            actor=p.call.actor,
        )
        try:
            answer = unit.redeem(
                code,
                attempt,
                open_key=self._open_key,
                code_limit=self._code_limit,
                now=now,
                now_step=time_step(now),
            )
        except InvalidArgument as error:
            if error.reason != "IDEMPOTENCY_CONFLICT":
                raise
            # The redemption is keyed by the transaction id: the id was used for another transaction.
            raise _conflict("transaction.transaction_id") from None
        p.redemption = answer
        if not answer.customer_id:
            # UNKNOWN_CODE: no enrolment has this code (or it matches no time), so nobody to attribute to.
            raise NotFound("no customer has this dynamic code", reason="DYNAMIC_CODE_NOT_FOUND")
        if answer.customer_id not in locked:
            # The handle changed hands between the first read and the lock (an enrolment replaced).
            raise _LinkMoved
        p.customer = answer.customer_id
        if answer.reason is Reason.OK:
            return
        decline = _CODE_DECLINES.get(answer.reason)
        if decline is None and answer.reason is Reason.NUMBER_NOT_ACTIVE:
            decline = _STATUS_DECLINES.get(primaries[answer.customer_id].status)
        if decline is None:
            decline = IdentityDecline(
                "DYNAMIC_CODE_INVALID", f"dynamic code was refused ({answer.reason.value.replace('_', ' ')})"
            )
        p.identity = decline


def _policy_facts(
    unit: ScoringUnit,
    policy: Policy,
    todo: Sequence[_Pending],
    primaries: dict[str, CustomerNumber],
    now: datetime,
) -> dict[int, PolicyFacts]:
    """What lists and rules read beyond the transaction, per call (by ``id``), read under the lock.

    Whether a merchant or terminal is new to the customer, and the numbers' signals, are read only when an
    active rule names them: without such a rule they cost nothing. Within a batch, a customer's second
    payment at a place is not new: the first one, earlier in the batch, is stored before it.
    """
    if policy.empty:
        return {}
    live = [p for p in todo if p.error is None and p.identity is None and p.customer]
    customers = {p.customer for p in live}
    places = "customer.new_merchant" in policy.needs or "customer.new_terminal" in policy.needs
    seen_merchants: set[tuple[str, str]] = set()
    seen_terminals: set[tuple[str, str]] = set()
    if places:
        seen_merchants, seen_terminals = unit.places_seen(
            customers, {p.call.txn.merchant_id for p in live}, {p.call.txn.terminal_id for p in live}
        )
    signals = (
        unit.number_signals(customers, now) if any(n.startswith("number.") for n in policy.needs) else {}
    )
    facts: dict[int, PolicyFacts] = {}
    for p in live:
        txn, payer = p.call.txn, p.call.payer
        primary = primaries.get(p.customer)
        numbers = tuple(
            dict.fromkeys(n for n in (payer.number, primary.number if primary else None) if n is not None)
        )
        external = f"{payer.external.namespace}:{payer.external.value}" if payer.external else ""
        new_merchant = new_terminal = None
        if places:
            new_merchant = (p.customer, txn.merchant_id) not in seen_merchants
            new_terminal = bool(txn.terminal_id) and (p.customer, txn.terminal_id) not in seen_terminals
            seen_merchants.add((p.customer, txn.merchant_id))
            seen_terminals.add((p.customer, txn.terminal_id))
        facts[id(p)] = PolicyFacts(numbers, external, new_merchant, new_terminal, signals.get(p.customer))
    return facts


def _first_look(unit: ScoringUnit, call: ScoreCall, code: PresentedCode | None) -> _Pending:
    """A call, with what can be told before any customer is read: a retry, a conflict, a bad amount.

    ``code``: the call's dynamic code, parsed (None when it names its customer otherwise)."""
    p = _Pending(call)
    try:
        # Checked before a code is redeemed: a call refused after its redemption would spend the code.
        major_amount(call.txn.amount_minor, call.txn.currency)
        p.replay = unit.replay_of(call.txn.transaction_id, call.fingerprint, call.actor, call.request_id)
    except PosguardError as error:
        p.error = error
        return p
    if p.replay is None:
        p.code = code
    return p


def _parsed(code: str | None) -> PresentedCode | None:
    if code is None:
        return None
    parsed = parse_code(code)
    assert parsed is not None  # validated
    return parsed


def _conflict(field: str) -> InvalidArgument:
    return InvalidArgument.field(
        field, "was already used for a different transaction", reason="IDEMPOTENCY_CONFLICT"
    )


def _refuse_conflicts_within(pending: Sequence[_Pending]) -> None:
    """Refuse a call that reuses an id of an earlier call of the same batch for another transaction.

    The store would refuse it too, but only after its dynamic code was redeemed: a code spent on a
    transaction that is never stored. (A repeat with the same fingerprint is a retry: the store replays it.)
    """
    fingerprints: dict[str, str] = {}
    request_ids: dict[tuple[str, str], str] = {}  # (caller, request_id) → transaction id
    for p in pending:
        txn_id, key = p.call.txn.transaction_id, (p.call.actor, p.call.request_id)
        if p.error is None and p.replay is None:
            if fingerprints.get(txn_id, p.call.fingerprint) != p.call.fingerprint:
                p.error = _conflict("transaction.transaction_id")
            elif p.call.request_id and request_ids.get(key, txn_id) != txn_id:
                p.error = _conflict("request_id")
        if p.error is None:
            fingerprints.setdefault(txn_id, p.call.fingerprint)
            if p.call.request_id:
                request_ids.setdefault(key, txn_id)


def _by_number(
    number: str,
    stored: dict[str, tuple[CustomerNumber, str]],
    primaries: dict[str, CustomerNumber],
    txn: TransactionInput,
) -> tuple[str, IdentityDecline | None]:
    found = stored.get(number)
    if found is None:
        raise NotFound("no customer has this number", reason="NUMBER_NOT_FOUND")
    row, customer_id = found
    if row.status is not NumberStatus.ACTIVE:
        return customer_id, _STATUS_DECLINES[row.status]
    if row.kind is NumberKind.SUB:
        # A sub number is only as good as its customer's primary, and only inside its scope.
        primary = primaries[customer_id]
        if primary.status is not NumberStatus.ACTIVE:
            return customer_id, IdentityDecline(
                _STATUS_DECLINES[primary.status].code,
                f"the primary number of this sub number is {primary.status.value}",
            )
        if row.scope_merchant_id and row.scope_merchant_id != txn.merchant_id:
            return customer_id, IdentityDecline(
                "NUMBER_OUT_OF_SCOPE", "this sub number may not pay at this merchant"
            )
        if row.scope_channel and row.scope_channel != txn.channel:
            return customer_id, IdentityDecline(
                "NUMBER_OUT_OF_SCOPE", f"this sub number may pay only through channel {row.scope_channel}"
            )
    return customer_id, None


def _linked(ref: ExternalRef, linked: dict[ExternalRef, str], before: dict[ExternalRef, str]) -> str:
    """The customer an external id names now; the customer pays under its current primary number."""
    customer_id = linked.get(ref)
    if customer_id is None:
        raise NotFound("no such customer", reason="CUSTOMER_NOT_FOUND")
    if customer_id != before.get(ref):
        raise _LinkMoved  # linked anew since the first read: that customer is not locked
    return customer_id
