"""Redemptions of dynamic codes, a batch per database transaction.

A till redeems a code when a customer pays with one, so this is a gateway hot path. A batch of concurrent
redemptions (``api.group_commit``) reads what decides them in a few statements (earlier attempts by
request_id, the enrolments named, locked in handle order, their customers' primary numbers, the codes of
those enrolments already used around now), judges each in order in memory (a code used by an earlier item of
the batch is used), and writes the batch back with one executemany per table and one audit append. The
statements are SQLAlchemy Core, built once.

Scoring redeems the code a transaction names inside its own unit of work with ``redeem_in``: the same
judgment, for a batch of one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import bindparam, insert, select, update

from posguard_server.domain.customers import NumberStatus, mask
from posguard_server.domain.dynamic_codes import (
    GUESSES,
    SKEW_STEPS,
    PresentedCode,
    Reason,
    decide,
    match_step,
)
from posguard_server.domain.enumeration import (
    FailureLimit,
    FailureWindow,
    count_failure,
    refusal,
    refused_until,
)
from posguard_server.domain.errors import PosguardError
from posguard_server.store.audit import NewEvent, append_events
from posguard_server.store.caller_limits import CallerLimits
from posguard_server.store.customers import primary_states_in
from posguard_server.store.db import rerun_on_conflict
from posguard_server.store.dynamic_codes import (
    Attempt,
    OpenKey,
    RedemptionAnswer,
    SqlDynamicCodeAttempt,
    SqlDynamicCodeUse,
    SqlDynamicEnrollment,
)
from posguard_server.store.idempotency import idempotency_conflict

if TYPE_CHECKING:
    from sqlalchemy import Table

    from posguard_server.store.db import Database
    from posguard_server.store.driver import Runs

METHOD = "RedeemDynamicCode"


@dataclass(frozen=True, slots=True)
class Redemption:
    """One RedeemDynamicCode call: the code presented (None when malformed), at ``now`` (its TOTP step)."""

    code: PresentedCode | None
    attempt: Attempt
    now: datetime
    now_step: int


@dataclass(frozen=True, slots=True)
class Redeemed:
    """The answer to a redemption, or None when its caller was refused (until ``refused_until``).

    With an answer, ``refused_until`` is set when this redemption's failure refused the caller.
    """

    answer: RedemptionAnswer | None
    refused_until: datetime | None = None


_attempts = cast("Table", SqlDynamicCodeAttempt.__table__)
_uses = cast("Table", SqlDynamicCodeUse.__table__)
_enrolments = cast("Table", SqlDynamicEnrollment.__table__)
_A, _U, _E = _attempts.c, _uses.c, _enrolments.c
_EARLIER = select(_A.request_id, _A.attempted_by, _A.fingerprint, _A.reason, _A.customer_id, _A.number).where(
    _A.request_id.in_(bindparam("request_ids", expanding=True))
)
# Locked, so concurrent redemptions against one enrolment are judged one after the other.
_ENROLMENTS = (
    select(
        _E.id,
        _E.handle,
        _E.customer_id,
        _E.secret_ciphertext,
        _E.key_version,
        _E.guess_window_started_at,
        _E.guess_window_failures,
    )
    .where(_E.handle.in_(bindparam("handles", expanding=True)))
    .order_by(_E.handle)
    .with_for_update()
)
_USED = select(_U.handle, _U.step).where(
    _U.handle.in_(bindparam("handles", expanding=True)),
    _U.step.between(bindparam("first_step"), bindparam("last_step")),
)
_ADD_USES = insert(_uses)
_ADD_ATTEMPTS = insert(_attempts)
_COUNT_REFUSALS = (
    update(_enrolments)
    .where(_E.id == bindparam("b_id"))
    .values(
        refusals=_E.refusals + bindparam("b_refusals"),
        replays=_E.replays + bindparam("b_replays"),
        last_refused_at=bindparam("b_at", type_=_E.last_refused_at.type),
        guess_window_started_at=bindparam("b_started", type_=_E.guess_window_started_at.type),
        guess_window_failures=bindparam("b_failures"),
    )
)


class SqlRedemptionStore:
    """``limit`` counts guesses per caller; ``code_limit``, wrong codes per enrolment from any caller."""

    def __init__(
        self, database: Database, open_key: OpenKey, limit: FailureLimit, *, code_limit: FailureLimit
    ) -> None:
        self._db = database
        self._open_key = open_key
        self._limit = limit
        self._code_limit = code_limit

    def redeem_many(self, items: Sequence[Redemption]) -> list[Redeemed | PosguardError]:
        """Redeem a batch of concurrent calls in one transaction, in order; one result per item.

        Guesses count toward their caller's failure limit; a caller refused (before or by this batch) has
        the rest of its calls refused with nothing recorded. A request_id already used for another request
        gets its own error. Losing a race on a unique constraint (the same request_id in another process)
        re-runs the batch, which then sees the winner.
        """
        return rerun_on_conflict(lambda: self._redeem(items))

    def _redeem(self, items: Sequence[Redemption]) -> list[Redeemed | PosguardError]:
        now = max(item.now for item in items)
        with self._db.statements_unit() as connection:
            # Caller rows first, then enrolments, then the audit head: the lock order of every path.
            limits = CallerLimits(connection, self._limit, {i.attempt.actor for i in items}, now)
            batch = _Batch(connection, items, self._open_key, self._code_limit)
            results: list[Redeemed | PosguardError] = []
            for slot, item in enumerate(items):
                caller = item.attempt.actor
                until = limits.refused_until(caller)
                if until is not None:  # refused, before or by an earlier guess of this batch: not judged
                    results.append(Redeemed(None, until))
                    continue
                answer = batch.judge(slot)
                if isinstance(answer, PosguardError):
                    results.append(answer)
                    continue
                guess = answer.reason in GUESSES and not answer.replayed  # a replay was counted already
                results.append(Redeemed(answer, limits.count(caller) if guess else None))
            # Sent together on PostgreSQL: two round trips, split where the audit head is read (and locked).
            with connection.together():
                batch.write(now)
                limits.save(connection, METHOD)
        return results


def redeem_in(
    connection: Runs,
    code: PresentedCode | None,
    attempt: Attempt,
    *,
    open_key: OpenKey,
    code_limit: FailureLimit,
    now: datetime,
    now_step: int,
) -> RedemptionAnswer:
    """Judge a presented code (None when malformed) and record the answer, inside the caller's transaction.

    The enrolment is locked until the caller commits; nothing is kept unless the caller's transaction
    commits (a failed score spends no code). An idempotency conflict raises ``InvalidArgument``; an
    enrolment refused for too many wrong codes, ``ResourceExhausted``.
    """
    batch = _Batch(connection, [Redemption(code, attempt, now, now_step)], open_key, code_limit)
    answer = batch.judge(0)
    if isinstance(answer, PosguardError):
        raise answer
    batch.write(now)
    return answer


@dataclass(slots=True)
class _Attempted:
    """An attempt stored, or recorded earlier in this batch: what a retry with its request_id replays."""

    fingerprint: str
    answer: RedemptionAnswer


class _Batch:
    """The redemptions of one transaction: what decides them, read up front; what they change, kept."""

    def __init__(
        self, connection: Runs, items: Sequence[Redemption], open_key: OpenKey, code_limit: FailureLimit
    ) -> None:
        self._connection = connection
        self._items = items
        self._open_key = open_key
        self._code_limit = code_limit
        self._earlier = _earlier(
            connection, {(item.attempt.actor, item.attempt.request_id) for item in items}
        )
        handles = sorted({item.code.handle for item in items if item.code is not None})
        self._enrolments: dict[str, Any] = {}  # rows of _ENROLMENTS by handle
        self._primaries: dict[str, tuple[str, NumberStatus]] = {}  # number and status by customer
        self._used: set[tuple[str, int]] = set()
        if handles:
            self._enrolments = {
                row.handle: row for row in connection.execute(_ENROLMENTS, {"handles": handles})
            }
            customers = {row.customer_id for row in self._enrolments.values()}
            self._primaries = primary_states_in(connection, customers)
            steps = [item.now_step for item in items]
            window = {"first_step": min(steps) - SKEW_STEPS, "last_step": max(steps) + SKEW_STEPS}
            used = connection.execute(_USED, {"handles": sorted(self._enrolments), **window})
            self._used = {(row.handle, row.step) for row in used}
        self._keys: dict[str, bytes] = {}  # decrypted once per enrolment and batch
        self._new_uses: list[dict[str, Any]] = []
        self._new_attempts: list[dict[str, Any]] = []
        self._refusals: Counter[int] = Counter()  # by enrolment id
        self._enrolments_by_id = {row.id: row for row in self._enrolments.values()}
        self._code_windows: dict[int, FailureWindow] = {}  # wrong codes per enrolment, once one is counted
        self._replays: Counter[int] = Counter()
        self._events: list[NewEvent] = []

    def judge(self, slot: int) -> RedemptionAnswer | PosguardError:
        """The answer to item ``slot``, judged after the items before it, and recorded for ``write``."""
        item = self._items[slot]
        code, attempt = item.code, item.attempt
        key = (attempt.actor, attempt.request_id)  # a request_id is its caller's own
        earlier = self._earlier.get(key)
        if earlier is not None:
            if earlier.fingerprint != attempt.fingerprint:
                return idempotency_conflict()
            answer = earlier.answer
            return RedemptionAnswer(answer.reason, answer.customer_id, answer.number, replayed=True)
        reason, step, enrolment = Reason.MALFORMED, None, None
        customer_id = number = ""
        if code is not None:
            locked_until = self._code_refused_until(code.handle, item.now)
            if locked_until is not None:  # judged no further: a guess at a locked enrolment learns nothing
                return refusal(
                    locked_until,
                    item.now,
                    message="too many wrong codes for this customer's dynamic codes",
                    reason="TOO_MANY_CODE_FAILURES",
                )
            reason, step, enrolment, primary = self._judge(code, attempt, item.now_step)
            if enrolment is not None and reason not in GUESSES:
                # Attributed: the code matched the enrolment's key, so naming its owner reveals nothing.
                customer_id, number = enrolment.customer_id, primary
        if reason is Reason.OK:
            assert code is not None
            assert step is not None
            self._used.add((code.handle, step))
            self._new_uses.append(
                {
                    "handle": code.handle,
                    "step": step,
                    "customer_id": customer_id,
                    "request_id": attempt.request_id,
                    "used_at": item.now,
                }
            )
        elif enrolment is not None:
            # Counted also for UNKNOWN_CODE: guesses against a known handle are a risk signal too.
            self._refusals[enrolment.id] += 1
            self._replays[enrolment.id] += reason is Reason.ALREADY_USED
            if reason is Reason.UNKNOWN_CODE and self._code_limit.enabled:
                # A wrong code for a real handle: counted per enrolment over every key (the per-target limit).
                self._code_windows[enrolment.id] = count_failure(
                    self._code_window(enrolment), item.now, self._code_limit
                ).window
        self._new_attempts.append(
            {
                "request_id": attempt.request_id,
                "fingerprint": attempt.fingerprint,
                "reason": reason.value,
                "handle": code.handle if code is not None else None,
                "step": step,
                "customer_id": customer_id or None,
                "number": number or None,
                "merchant_id": attempt.merchant_id,
                "terminal_id": attempt.terminal_id,
                "amount_minor": attempt.amount[0] if attempt.amount else None,
                "currency": attempt.amount[1] if attempt.amount else None,
                "attempted_at": item.now,
                "attempted_by": attempt.actor,
            }
        )
        answer = RedemptionAnswer(reason, customer_id, number, replayed=False)
        self._earlier[key] = _Attempted(attempt.fingerprint, answer)
        if reason is not Reason.MALFORMED:
            # Never the code: a refused code (e.g. WRONG_CUSTOMER) may still be redeemable.
            details = {"reason": reason.name, "merchant_id": attempt.merchant_id}
            if customer_id:
                details["customer_id"] = customer_id
            action = "dynamic_code.redeemed" if reason is Reason.OK else "dynamic_code.refused"
            self._events.append(
                NewEvent(attempt.actor, action, mask(number) if number else "unknown", details)
            )
        return answer

    def _code_window(self, enrolment: Any) -> FailureWindow | None:
        """The wrong codes counted against ``enrolment`` (a row of _ENROLMENTS) in its current window."""
        counted = self._code_windows.get(enrolment.id)
        if counted is not None:
            return counted
        if enrolment.guess_window_started_at is None:
            return None
        return FailureWindow(enrolment.guess_window_started_at, enrolment.guess_window_failures)

    def _code_refused_until(self, handle: str, now: datetime) -> datetime | None:
        enrolment = self._enrolments.get(handle)
        if enrolment is None:
            return None
        return refused_until(self._code_window(enrolment), now, self._code_limit)

    def _judge(
        self, code: PresentedCode, attempt: Attempt, now_step: int
    ) -> tuple[Reason, int | None, Any, str]:
        """``(reason, matched step, enrolment, customer's primary number)`` for a presented code."""
        enrolment = self._enrolments.get(code.handle)
        if enrolment is None:
            return Reason.UNKNOWN_CODE, None, None, ""
        key = self._keys.get(code.handle)
        if key is None:
            key = self._open_key(enrolment.secret_ciphertext, enrolment.customer_id, enrolment.key_version)
            self._keys[code.handle] = key
        match, step = match_step(key, code.totp, now_step)
        primary, status = self._primaries[enrolment.customer_id]
        reason = decide(
            match,
            number_active=status is NumberStatus.ACTIVE,
            customer_matches=attempt.expected_number in (None, primary),
            already_used=step is not None and (code.handle, step) in self._used,
        )
        return reason, step, enrolment, primary

    def write(self, now: datetime) -> None:
        """Store what the judged items changed, and audit them (the last write: see ``append_event``)."""
        connection = self._connection
        if self._new_uses:
            connection.execute(_ADD_USES, self._new_uses)
        if self._refusals:
            connection.execute(
                _COUNT_REFUSALS,
                [
                    {
                        "b_id": i,
                        "b_refusals": n,
                        "b_replays": self._replays[i],
                        "b_at": now,
                        **self._window_columns(i),
                    }
                    for i, n in sorted(self._refusals.items())
                ],
            )
        if self._new_attempts:
            connection.execute(_ADD_ATTEMPTS, self._new_attempts)
        append_events(connection, self._events, now)

    def _window_columns(self, enrolment_id: int) -> dict[str, Any]:
        """The wrong-code window of an enrolment to write back: as counted, or as it was read."""
        window = self._code_windows.get(enrolment_id)
        if window is None:
            row = self._enrolments_by_id[enrolment_id]
            return {"b_started": row.guess_window_started_at, "b_failures": row.guess_window_failures}
        return {"b_started": window.started_at, "b_failures": window.failures}


def _earlier(connection: Runs, keys: set[tuple[str, str]]) -> dict[tuple[str, str], _Attempted]:
    """The attempts stored under the (caller, request_id) ``keys``."""
    rows = connection.execute(_EARLIER, {"request_ids": sorted({request_id for _, request_id in keys})})
    return {
        (row.attempted_by, row.request_id): _Attempted(
            row.fingerprint,
            RedemptionAnswer(Reason(row.reason), row.customer_id or "", row.number or "", False),
        )
        for row in rows
        if (row.attempted_by, row.request_id) in keys
    }
