"""Verifications of customer numbers, in batches of concurrent calls.

A till verifies a number whenever a customer keys one in, so this is a gateway hot path.

``verify_many`` runs a batch of concurrent verifications (``api.group_commit``) in one transaction: it reads
the numbers it names, decides each verdict, moves the numbers' counters and records the failures, and is
durable before the answers. The statements are SQLAlchemy Core, built once. Failures count per caller and
per presented number, are audited, and guesses (a number that is not one, or was never issued) count toward
the caller's failure limit (``domain.enumeration``).

On SQLite a verification is first read where the call runs (``LocalReads``, no thread hop): a success is
answered from that read and its counters are written after the answer (``count_verified``); anything else
goes to ``verify_many``. The number was active when it was read, so that answer is as true as a write
transaction's: a revocation committed before the read is seen, one committed after it comes after the
verification. On PostgreSQL a read is a network round trip, which must not hold up the event loop, so every
verification takes ``verify_many``.
"""

from __future__ import annotations

import functools
import sqlite3
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, cast

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
    number_of_row,
    numbers_in,
    primaries_in,
)
from posguard_server.store.schema import insert_for, sqlite_time

if TYPE_CHECKING:
    from sqlalchemy import Table

    from posguard_server.store.db import Database
    from posguard_server.store.driver import Runs

METHOD = "VerifyCustomerId"
FAILED = "verification.failed"  # the audit action


class Presented(NamedTuple):
    """One verification: the number in canonical form, or as typed when it is not a number (``problem``).

    This and the other records of a verification are NamedTuples, not frozen dataclasses: as immutable, and
    less than half the cost to make (0.33 µs against 0.74 for five fields), which a till's every
    verification pays several times.
    """

    number: str
    caller: str
    merchant_id: str = ""
    channel: str = ""
    problem: Verdict | None = None  # MALFORMED, UNKNOWN_ISSUER or CHECK_DIGITS


class Verification(NamedTuple):
    """A verdict with the number it was read from (None when not found), or a refusal.

    ``refused_until`` is set when the caller is refused: by this verification's failure reaching its limit
    (the verdict stands), or, with ``refused``, by an earlier failure in the same batch (nothing was done).
    """

    verdict: Verdict
    number: CustomerNumber | None = None
    customer_id: str = ""
    refused_until: datetime | None = None
    refused: bool = False


class Verified(NamedTuple):
    """A successful verification, answered already, whose number's counters are still to be moved."""

    number: str
    at: datetime


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


@functools.cache
def _count_sqlite(rows: int) -> str:
    """_COUNT for ``rows`` numbers in one statement of SQLite's SQL: (number, verifications, time) a row."""
    table, number = _numbers.name, _t.number.name
    verifications, at = _t.verifications.name, _t.last_verified_at.name
    counted = ", ".join(["(?, ?, ?)"] * rows)
    return (  # names from the table, values as parameters
        f"WITH counted(number, verified, at) AS (VALUES {counted}) "  # noqa: S608
        f"UPDATE {table} SET {verifications} = {verifications} + counted.verified, {at} = counted.at "
        f"FROM counted WHERE {table}.{number} = counted.number"
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

    def count_verified(self, items: Sequence[Verified]) -> None:
        """Move the counters of successful verifications already answered: one statement, one commit."""
        verified: Counter[str] = Counter()
        latest: dict[str, datetime] = {}
        for item in items:
            verified[item.number] += 1
            latest[item.number] = max(latest.get(item.number, item.at), item.at)
        numbers = sorted(verified)  # in one order, as _write does
        with self._db.statements_unit() as connection:
            if connection.dialect.name == "sqlite":
                # One statement for the batch, through the driver. An executemany would step the statement
                # once a row, and the driver lets go of the interpreter lock at each step: a writer thread
                # beside a busy event loop then waits for it again every row (up to the switch interval).
                values = [v for n in numbers for v in (n, verified[n], sqlite_time(latest[n]))]
                # Padded to a power of two with rows of no number, which match none: a few statement texts
                # instead of one a batch size, so the driver's cache of prepared statements keeps the others.
                rows = 1 << (len(numbers) - 1).bit_length()
                values += ["", 0, ""] * (rows - len(numbers))
                connection.execute_sql(_count_sqlite(rows), values)
                return
            connection.execute(
                _COUNT,
                [
                    {"b_number": n, "b_verifications": verified[n], "b_failed": 0, "b_at": latest[n]}
                    for n in numbers
                ],
            )

    def verify_many(self, items: Sequence[Presented]) -> list[Verification]:
        """Verify ``items`` in one transaction, in order; one answer per item."""
        now = datetime.now(UTC)
        with self._db.statements_unit() as connection:
            answers = _verdicts(connection, items)
            limits = self._count_guesses(connection, items, answers, now)
            done = [(item, answer) for item, answer in zip(items, answers, strict=True) if not answer.refused]
            failed = [
                NewEvent(item.caller, FAILED, mask(item.number), {"reason": answer.verdict.value})
                for item, answer in done
                if answer.verdict is not Verdict.OK
            ]
            # Sent together on PostgreSQL, split where the audit head is read (and locked).
            with connection.together():
                self._write(connection, done, now)
                append_events(connection, failed, now)
                limits.save(connection, METHOD)
            return answers

    def _count_guesses(
        self, connection: Runs, items: Sequence[Presented], answers: list[Verification], now: datetime
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

    def _write(self, connection: Runs, done: list[tuple[Presented, Verification]], now: datetime) -> None:
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


_Found = dict[str, tuple[CustomerNumber, str]]


def _verdicts(connection: Runs, items: Sequence[Presented]) -> list[Verification]:
    found = numbers_in(connection, _wanted(items))
    subs = _active_subs(found)
    return _decide(items, found, primaries_in(connection, subs) if subs else {})


def _wanted(items: Sequence[Presented]) -> set[str]:
    """The numbers to read for ``items``: those that are numbers at all."""
    return {item.number for item in items if item.problem is None}


def _active_subs(found: _Found) -> set[str]:
    """The customers of the active sub numbers ``found``: their verdicts need the customer's primary."""
    return {
        customer_id
        for number, customer_id in found.values()
        if number.kind is NumberKind.SUB and number.status is NumberStatus.ACTIVE
    }


def _decide(
    items: Sequence[Presented], found: _Found, primaries: dict[str, CustomerNumber]
) -> list[Verification]:
    """The verdicts on ``items`` from the numbers ``found`` and the primaries of their active sub numbers'
    customers (``_active_subs``)."""
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


# -- reads on the event loop (SQLite) -------------------------------------------------------------------


class _Row(NamedTuple):
    """What number_of_row reads, and the customer id, as the driver reads it.

    Not the counters, which change with every verification: a row read again is then the same tuple, and its
    decoded number can be kept (``LocalReads._decoded``).
    """

    number: str
    customer_id: str
    kind: str
    status: str
    issuer: str
    key_version: int
    issued_at: str
    status_changed_at: str
    status_reason: str | None
    successor_number: str | None
    primary_number: str | None
    scope_merchant_id: str | None
    scope_channel: str | None
    label: str | None


_READ = _Row._fields
assert set(_READ) <= set(_numbers.c.keys())
# Only the table's own names go into the text; every value is bound.
_SELECT = f"SELECT {', '.join(_READ)} FROM {_numbers.name} WHERE "  # noqa: S608
# The rows numbers_in and primaries_in read (store.customers), in the driver's own SQL; a test holds them
# equal. ``{}`` is the list of placeholders.
_NUMBERS_SQL = _SELECT + "number IN ({})"
_PRIMARIES_SQL = (
    _SELECT + f"customer_id IN ({{}}) AND kind = '{NumberKind.STATIC.value}' AND successor_number IS NULL"
)
# Decoded rows kept, at most (a few hundred bytes each); past it the cache starts again.
_DECODED_MAX = 8192


class LocalReads:
    """Verdicts read on the calling thread through the sqlite3 driver, for SQLite's event-loop fast path.

    An indexed read of a few rows in WAL mode takes microseconds and never waits for a writer, so it runs on
    the event loop with no thread hop. SQLAlchemy's work per statement (begin, execute, roll back: about
    0.15 ms, measured) would cost more than the read, hence the driver; and a row read before is decoded
    once (the same tuple of values gives the same number). A read that fails (a busy or damaged database)
    gives None: the caller then takes ``verify_many``, which reports it as it must. One connection, used by
    one thread at a time (the event loop's).
    """

    def __init__(self, database: Database) -> None:
        self._connection = database.sqlite_reader()
        self._decoded: dict[tuple[Any, ...], tuple[CustomerNumber, str]] = {}

    def verdicts(self, items: Sequence[Presented]) -> list[Verification | None]:
        """One verdict per item, in order, from one snapshot; None for each when the read failed."""
        connection = self._connection
        wanted = _wanted(items)
        try:
            # One statement reads one snapshot, in autocommit mode. Only an active sub number's verdict
            # needs a second read, of its primary, as of the same moment: then both are read again, in one
            # read transaction. A transaction for every call cost two statements more (BEGIN and COMMIT,
            # about 12 µs of a verification's CPU in a server under load).
            found = self._numbers(wanted)
            if not _active_subs(found):
                return list(_decide(items, found, {}))
            connection.execute("BEGIN")
            try:
                found = self._numbers(wanted)
                subs = _active_subs(found)
                return list(_decide(items, found, self._primaries(subs) if subs else {}))
            finally:
                connection.execute("COMMIT")
        except sqlite3.Error:
            if connection.in_transaction:
                connection.rollback()
            return [None] * len(items)

    def close(self) -> None:
        self._connection.close()

    def _numbers(self, numbers: Collection[str]) -> _Found:
        found = (self._decode(row) for row in self._rows(_NUMBERS_SQL, numbers))
        return {number.number: (number, customer_id) for number, customer_id in found}

    def _primaries(self, customer_ids: Collection[str]) -> dict[str, CustomerNumber]:
        found = (self._decode(row) for row in self._rows(_PRIMARIES_SQL, customer_ids))
        return {customer_id: number for number, customer_id in found}

    def _rows(self, sql: str, values: Collection[str]) -> list[tuple[Any, ...]]:
        if not values:
            return []
        rows: list[tuple[Any, ...]] = self._connection.execute(
            sql.format(_placeholders(len(values))), list(values)
        ).fetchall()
        return rows

    def _decode(self, values: tuple[Any, ...]) -> tuple[CustomerNumber, str]:
        decoded = self._decoded.get(values)
        if decoded is None:
            if len(self._decoded) >= _DECODED_MAX:
                self._decoded.clear()
            row = _Row._make(values)
            number = replace(
                number_of_row(cast("SqlCustomerNumber", row)),
                # SQLite keeps times as UTC text (store.schema.UTCDateTime).
                issued_at=_utc(row.issued_at),
                status_changed_at=_utc(row.status_changed_at),
            )
            decoded = self._decoded[values] = (number, row.customer_id)
        return decoded


@functools.cache
def _placeholders(count: int) -> str:
    return ", ".join("?" * count)


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)
