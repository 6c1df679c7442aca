"""Verifications of customer numbers, a batch per database transaction.

A till verifies a number whenever a customer keys one in, so this is a gateway hot path. A batch of
concurrent verifications (``api.group_commit``) reads the numbers it names, decides each verdict, moves the
numbers' counters and records the failures in one transaction: the status a verdict was read from is the
status its counters are written under, and every answer, success or failure, is durable before it is given.

The statements are SQLAlchemy Core, built once: a successful verification costs its share of one indexed
read and one executemany of counter updates, and its share of the batch's commit. Failures also count per
caller and per presented number, are audited, and guesses (a number that is not one, or was never issued)
count toward the caller's failure limit (``domain.enumeration``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import bindparam, update

from posguard_server.domain.customers import CustomerNumber, NumberKind, NumberStatus, mask
from posguard_server.domain.enumeration import FailureLimit
from posguard_server.domain.verification import GUESSES, Verdict, verdict
from posguard_server.store.audit import NewEvent, append_events
from posguard_server.store.caller_limits import CallerLimits
from posguard_server.store.customers import (
    NUMBER_MAX,
    SqlCustomerNumber,
    SqlVerificationFailure,
    numbers_in,
    primaries_in,
)
from posguard_server.store.schema import insert_for

if TYPE_CHECKING:
    from sqlalchemy import Connection, Table

    from posguard_server.store.db import Database

METHOD = "VerifyCustomerId"
FAILED = "verification.failed"  # the audit action


@dataclass(frozen=True, slots=True)
class Presented:
    """One verification: the number in canonical form, or as typed when it is not a number (``problem``)."""

    number: str
    caller: str
    merchant_id: str = ""
    channel: str = ""
    problem: Verdict | None = None  # MALFORMED, UNKNOWN_ISSUER or CHECK_DIGITS


@dataclass(frozen=True, slots=True)
class Verification:
    """A verdict with the number it was read from (None when not found), or a refusal.

    ``refused_until`` is set when the caller is refused: by this verification's failure reaching its limit
    (the verdict stands), or, with ``refused``, by an earlier failure in the same batch (nothing was done).
    """

    verdict: Verdict
    number: CustomerNumber | None = None
    customer_id: str = ""
    refused_until: datetime | None = None
    refused: bool = False


_numbers = cast("Table", SqlCustomerNumber.__table__)
_t = _numbers.c
_COUNT = (
    update(_numbers)
    .where(_t.number == bindparam("b_number"))
    .values(
        verifications=_t.verifications + bindparam("b_verifications"),
        failed_verifications=_t.failed_verifications + bindparam("b_failed"),
        last_verified_at=bindparam("b_at"),
    )
)


def _count_failures_statement(dialect: str) -> Any:
    table = SqlVerificationFailure.__table__
    insert = insert_for(dialect)(table)
    return insert.on_conflict_do_update(
        index_elements=[table.c.scope, table.c.subject],
        set_={
            "failures": table.c.failures + insert.excluded.failures,
            "last_failed_at": insert.excluded.last_failed_at,
        },
    )


class SqlVerificationStore:
    def __init__(self, database: Database, limit: FailureLimit) -> None:
        self._db = database
        self._limit = limit
        self._count_failures = _count_failures_statement(database.dialect)

    def verify_many(self, items: Sequence[Presented]) -> list[Verification]:
        """Verify ``items`` in one transaction, in order; one answer per item."""
        now = datetime.now(UTC)
        with self._db.session() as session:
            connection = session.connection()
            answers = _verdicts(connection, items)
            limits = self._count_guesses(connection, items, answers, now)
            done = [(item, answer) for item, answer in zip(items, answers, strict=True) if not answer.refused]
            self._write(connection, done, now)
            failed = [
                NewEvent(item.caller, FAILED, mask(item.number), {"reason": answer.verdict.value})
                for item, answer in done
                if answer.verdict is not Verdict.OK
            ]
            append_events(session, failed, now)
            limits.save(session, METHOD)
            return answers

    def _count_guesses(
        self, connection: Connection, items: Sequence[Presented], answers: list[Verification], now: datetime
    ) -> CallerLimits:
        """Count each guess against its caller's limit; refuse what a caller sends once it is refused.

        Updates ``answers`` in place. Only the callers that guessed are locked: a batch of successful
        verifications touches no caller row.
        """
        first_guess: dict[str, int] = {}  # by caller
        for slot, answer in enumerate(answers):
            if answer.verdict in GUESSES:
                first_guess.setdefault(items[slot].caller, slot)
        limits = CallerLimits(connection, self._limit, first_guess, now)
        if not self._limit.enabled:
            return limits
        for caller, first in first_guess.items():
            # Refused already (by another process, or a batch this one did not see): nothing more is done.
            until = limits.refused_until(caller)
            for slot in range(first, len(items)):
                if items[slot].caller != caller:
                    continue
                if until is not None:  # refused by an earlier failure: nothing is done
                    answers[slot] = Verification(answers[slot].verdict, refused_until=until, refused=True)
                elif answers[slot].verdict in GUESSES:
                    until = limits.count(caller)
                    answers[slot] = _with_refusal(answers[slot], until)
        return limits

    def _write(
        self, connection: Connection, done: list[tuple[Presented, Verification]], now: datetime
    ) -> None:
        """Move the counters of the numbers verified, and count failures per caller and per number."""
        verified: Counter[str] = Counter()
        failed: Counter[str] = Counter()
        failures: Counter[tuple[str, str]] = Counter()
        for item, answer in done:
            if answer.number is not None:
                verified[item.number] += 1
            if answer.verdict is not Verdict.OK:
                failed[item.number] += 1
                failures["caller", item.caller] += 1
                # Truncated here, where it is both looked up and stored: the column holds NUMBER_MAX.
                failures["number", item.number[:NUMBER_MAX]] += 1
        # In one order (sorted), so that concurrent batches on PostgreSQL take the row locks alike.
        if verified:
            connection.execute(
                _COUNT,
                [
                    {"b_number": n, "b_verifications": verified[n], "b_failed": failed[n], "b_at": now}
                    for n in sorted(verified)
                ],
            )
        if failures:
            connection.execute(
                self._count_failures,
                [
                    {"scope": scope, "subject": subject, "failures": count, "last_failed_at": now}
                    for (scope, subject), count in sorted(failures.items())
                ],
            )


def _verdicts(connection: Connection, items: Sequence[Presented]) -> list[Verification]:
    found = numbers_in(connection, {item.number for item in items if item.problem is None})
    subs = {
        customer_id
        for number, customer_id in found.values()
        if number.kind is NumberKind.SUB and number.status is NumberStatus.ACTIVE
    }
    primaries = primaries_in(connection, subs)
    answers: list[Verification] = []
    for item in items:
        stored = found.get(item.number) if item.problem is None else None
        if stored is None:
            answers.append(Verification(item.problem or Verdict.NOT_FOUND))
            continue
        number, customer_id = stored
        decided = verdict(
            number, primaries.get(customer_id), merchant_id=item.merchant_id, channel=item.channel
        )
        answers.append(Verification(decided, number, customer_id))
    return answers


def _with_refusal(answer: Verification, until: datetime | None) -> Verification:
    if until is None:
        return answer
    return Verification(answer.verdict, answer.number, answer.customer_id, refused_until=until)
