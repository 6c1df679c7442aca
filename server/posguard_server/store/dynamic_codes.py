"""Storage of dynamic-code enrolments, used codes and redemption attempts.

A code is single use because each successful redemption inserts its (handle, step) into
``dynamic_code_uses``, whose primary key lets only one of two concurrent redemptions commit. Every attempt is
kept under its request_id, so a retried redemption gets the first answer instead of ALREADY_USED.

Codes issued on request (IssueDynamicCode, a gateway call) are read in batches of concurrent calls
(``api.group_commit`` on reader threads): one Core statement reads each number's status with its customer's
enrolment, so the status a code is issued under and the key it is made from are read together.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, cast

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    bindparam,
    select,
)
from sqlalchemy.orm import Mapped, mapped_column

from posguard_server.domain.customers import NumberStatus, mask
from posguard_server.domain.dynamic_codes import Reason
from posguard_server.domain.errors import FailedPrecondition, NotFound, PosguardError
from posguard_server.store.audit import append_event
from posguard_server.store.customers import SqlCustomerNumber
from posguard_server.store.db import rerun_on_conflict
from posguard_server.store.driver import Later
from posguard_server.store.idempotency import earlier_call, record_call
from posguard_server.store.schema import Base

if TYPE_CHECKING:
    from sqlalchemy import Table

    from posguard_server.store.db import Database
    from posguard_server.store.driver import Runs

HANDLE_LENGTH = 10
CUSTOMER_ID_MAX = 32
NUMBER_MAX = 40
REQUEST_ID_MAX = 128
FINGERPRINT_MAX = 64
MERCHANT_MAX = 64
_ENROLLED = "dynamic_code.enrolled"


class SqlDynamicEnrollment(Base):
    """A customer's enrolment: the handle that starts its codes and the encrypted TOTP key."""

    __tablename__ = "dynamic_enrollments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    customer_id: Mapped[str] = mapped_column(
        String(CUSTOMER_ID_MAX), ForeignKey("customers.customer_id"), unique=True
    )
    handle: Mapped[str] = mapped_column(String(HANDLE_LENGTH), unique=True)
    # AES-GCM ciphertext of the TOTP key (see SecretCipher); never plain in the database.
    secret_ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    key_version: Mapped[int] = mapped_column(Integer)
    enrolled_at: Mapped[datetime]
    enrolled_by: Mapped[str] = mapped_column(String(64))
    # Refused redemptions, and the replays among them: risk signals for the customer's transactions.
    refusals: Mapped[int] = mapped_column(BigInteger, default=0)
    replays: Mapped[int] = mapped_column(BigInteger, default=0)
    last_refused_at: Mapped[datetime | None]
    # Wrong codes against this enrolment in the current window, from any key (the per-target limit).
    guess_window_started_at: Mapped[datetime | None]
    guess_window_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The EnrollDynamicCodes call (request_id of ``enrolled_by``) that made this key: a retry of it may
    # show the key again; a retry of an earlier call, whose key this one replaced, may not.
    request_id: Mapped[str] = mapped_column(String(REQUEST_ID_MAX))
    request_fingerprint: Mapped[str] = mapped_column(String(FINGERPRINT_MAX))


class SqlDynamicCodeUse(Base):
    """A code that was redeemed: the primary key is what makes a code single use."""

    __tablename__ = "dynamic_code_uses"

    handle: Mapped[str] = mapped_column(String(HANDLE_LENGTH), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    customer_id: Mapped[str] = mapped_column(String(CUSTOMER_ID_MAX))
    request_id: Mapped[str] = mapped_column(String(REQUEST_ID_MAX))
    used_at: Mapped[datetime]


class SqlDynamicCodeAttempt(Base):
    """One redemption call and its answer, kept so that a retry with its request_id gets the same answer."""

    __tablename__ = "dynamic_code_attempts"
    __table_args__ = (
        CheckConstraint(
            "reason IN ('ok', 'malformed', 'expired', 'already_used', 'wrong_customer', 'not_enrolled', "
            "'number_not_active', 'unknown_code')",
            name="reason",
        ),
    )

    request_id: Mapped[str] = mapped_column(String(REQUEST_ID_MAX), primary_key=True)
    # The caller: a request_id is its caller's own (see store.idempotency).
    attempted_by: Mapped[str] = mapped_column(String(64), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(FINGERPRINT_MAX))
    reason: Mapped[str] = mapped_column(String(24))
    handle: Mapped[str | None] = mapped_column(String(HANDLE_LENGTH), index=True)
    step: Mapped[int | None] = mapped_column(BigInteger)
    customer_id: Mapped[str | None] = mapped_column(String(CUSTOMER_ID_MAX))
    number: Mapped[str | None] = mapped_column(String(NUMBER_MAX))
    merchant_id: Mapped[str] = mapped_column(String(MERCHANT_MAX))
    terminal_id: Mapped[str] = mapped_column(String(MERCHANT_MAX))
    amount_minor: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(String(3))
    attempted_at: Mapped[datetime] = mapped_column(index=True)


@dataclass(frozen=True, slots=True)
class StoredEnrollment:
    """An enrolment as stored; the caller decrypts the key."""

    customer_id: str
    handle: str
    secret_ciphertext: bytes
    key_version: int
    enrolled_at: datetime
    refusals: int
    replays: int


@dataclass(frozen=True, slots=True)
class Sealed:
    """A new enrolment's handle and encrypted key, made by the caller (who holds the keys)."""

    handle: str
    secret_ciphertext: bytes
    key_version: int


@dataclass(frozen=True, slots=True)
class Attempt:
    """What a redemption call presents, apart from the code."""

    request_id: str
    fingerprint: str
    expected_number: str | None
    merchant_id: str
    terminal_id: str
    amount: tuple[int, str] | None
    actor: str


@dataclass(frozen=True, slots=True)
class RedemptionAnswer:
    reason: Reason
    customer_id: str
    number: str
    replayed: bool


# (ciphertext, customer id, key version) → the TOTP key
OpenKey = Callable[[bytes, str, int], bytes]

_numbers = cast("Table", SqlCustomerNumber.__table__)
_enrolments = cast("Table", SqlDynamicEnrollment.__table__)
_primaries = _numbers.alias("primaries")
_N, _E = _numbers.c, _enrolments.c
# Each number named, its status, and its customer's enrolment if there is one (outer join): one read.
_ENROLMENTS_OF_NUMBERS = (
    select(
        _N.number,
        _N.status,
        _E.customer_id,
        _E.handle,
        _E.secret_ciphertext,
        _E.key_version,
        _E.enrolled_at,
        _E.refusals,
        _E.replays,
        _primaries.c.status.label("primary_status"),  # a sub number's primary; None for a primary
    )
    .select_from(
        _numbers.outerjoin(_enrolments, _E.customer_id == _N.customer_id).outerjoin(
            _primaries, _primaries.c.number == _N.primary_number
        )
    )
    .where(_N.number.in_(bindparam("numbers", expanding=True)))
)


def inactive_number(
    status: NumberStatus | None, primary_status: NumberStatus | None = None
) -> PosguardError | None:
    """Why a number of this status (None: never issued) cannot take dynamic codes; None when it can.

    A sub number is only as good as its customer's primary (``primary_status``, which IssueDynamicCode
    reads), as in verification: a code issued through a sub number whose primary is suspended or revoked
    would only be refused at redemption.
    """
    if status is None:
        return NotFound("no customer has this number", reason="NUMBER_NOT_FOUND")
    if status is not NumberStatus.ACTIVE:
        return FailedPrecondition(
            f"the number is {status.name.lower()}, not active", reason="NUMBER_NOT_ACTIVE"
        )
    if primary_status is not None and primary_status is not NumberStatus.ACTIVE:
        return FailedPrecondition(
            f"the number's primary number is {primary_status.name.lower()}, not active",
            reason="NUMBER_NOT_ACTIVE",
        )
    return None


class SqlDynamicCodeStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    # -- enrolment ------------------------------------------------------------------------------------

    def enroll(
        self,
        customer_id: str,
        number: str,
        seal: Callable[[], Sealed],
        *,
        replace_existing: bool,
        request_id: str,
        fingerprint: str,
        actor: str,
        now: datetime,
    ) -> tuple[StoredEnrollment, bool]:
        """Enrol a customer (or replace its enrolment); ``(enrolment, replayed)``.

        ``seal()`` makes a fresh handle and encrypted key; it is called again when a write lost a race (a
        handle collision, or a concurrent enrolment), and the whole decision is taken again.
        """
        return rerun_on_conflict(
            lambda: self._enroll_once(
                customer_id,
                number,
                seal(),
                replace_existing=replace_existing,
                request_id=request_id,
                fingerprint=fingerprint,
                actor=actor,
                now=now,
            )
        )

    def _enroll_once(
        self,
        customer_id: str,
        number: str,
        sealed: Sealed,
        *,
        replace_existing: bool,
        request_id: str,
        fingerprint: str,
        actor: str,
        now: datetime,
    ) -> tuple[StoredEnrollment, bool]:
        with self._db.session() as session:
            # The enrolment first (locked), then the key: a concurrent retry waits here and then replays.
            row = session.scalar(
                select(SqlDynamicEnrollment)
                .where(SqlDynamicEnrollment.customer_id == customer_id)
                .with_for_update()
            )
            done = earlier_call(session, _ENROLLED, actor, request_id, fingerprint)
            if done is not None:
                current = (
                    row is not None
                    and done.customer_id == customer_id
                    and (row.request_id, row.enrolled_by) == (request_id, actor)
                )
                if row is None or not current:
                    # Showing the replaced key again would hand out a secret that no longer works, and
                    # enrolling again would break the device holding the current one.
                    raise FailedPrecondition(
                        "the enrolment this request made has been replaced by a later one; its secret no "
                        "longer works (enrol again under a new request_id to replace the current one)",
                        reason="ENROLLMENT_REPLACED",
                    )
                return _enrollment(row), True
            if row is not None and not replace_existing:
                raise FailedPrecondition(
                    "the customer is already enrolled for dynamic codes; set replace_existing to replace",
                    reason="ALREADY_ENROLLED",
                )
            replaced = row is not None
            if row is None:
                row = SqlDynamicEnrollment(customer_id=customer_id, refusals=0, replays=0)
                session.add(row)
            # Replacing in place retires the old handle at once: its codes no longer find an enrolment.
            row.handle = sealed.handle
            row.secret_ciphertext = sealed.secret_ciphertext
            row.key_version = sealed.key_version
            row.enrolled_at = now
            row.enrolled_by = actor
            row.request_id = request_id
            row.request_fingerprint = fingerprint
            record_call(session, _ENROLLED, actor, request_id, fingerprint, customer_id=customer_id, now=now)
            session.flush()
            append_event(
                session,
                actor=actor,
                action=_ENROLLED,
                subject=mask(number),
                details={"customer_id": customer_id, "replaced": str(replaced).lower()},
                now=now,
            )
            return _enrollment(row), False

    def enrolments_to_issue(self, numbers: Sequence[str]) -> list[StoredEnrollment | PosguardError]:
        """For each number (canonical form), the enrolment a code is issued from, or why none may be.

        The numbers of concurrent IssueDynamicCode calls, read in one statement: an error per number that
        was never issued (NotFound), is not active, or whose customer is not enrolled (FailedPrecondition).
        """
        with self._db.statements_unit(read_only=True) as connection:
            rows = connection.execute(_ENROLMENTS_OF_NUMBERS, {"numbers": sorted(set(numbers))})
            found = {row.number: row for row in rows}
        answers: list[StoredEnrollment | PosguardError] = []
        for number in numbers:
            row = found.get(number)
            refused = (
                inactive_number(NumberStatus(row.status), _status(row.primary_status))
                if row is not None
                else inactive_number(None)
            )
            if refused is not None:
                answers.append(refused)
                continue
            assert row is not None
            if row.handle is None:
                message = "the customer is not enrolled for dynamic codes"
                answers.append(FailedPrecondition(message, reason="NOT_ENROLLED"))
            else:
                answers.append(_enrollment(cast(SqlDynamicEnrollment, row)))
        return answers

    def get_enrollment(self, customer_id: str) -> StoredEnrollment | None:
        with self._db.session(read_only=True) as session:
            row = session.scalar(
                select(SqlDynamicEnrollment).where(SqlDynamicEnrollment.customer_id == customer_id)
            )
            return _enrollment(row) if row is not None else None


_OWNERS = select(SqlDynamicEnrollment.handle, SqlDynamicEnrollment.customer_id).where(
    SqlDynamicEnrollment.handle.in_(bindparam("handles", expanding=True))
)


def enrolment_owners(connection: Runs, handles: Collection[str]) -> Later[dict[str, str]]:
    """The customer enrolled under each handle that is in use (read without a lock), read when asked for."""
    if not handles:
        return Later.known({})
    rows = connection.execute(_OWNERS, {"handles": sorted(handles)})
    return Later(lambda: {row.handle: row.customer_id for row in rows})


def _status(value: str | None) -> NumberStatus | None:
    return NumberStatus(value) if value is not None else None


def _enrollment(row: SqlDynamicEnrollment) -> StoredEnrollment:
    # Also given Core rows (cast to the class): they have the same attribute names.
    return StoredEnrollment(
        customer_id=row.customer_id,
        handle=row.handle,
        secret_ciphertext=row.secret_ciphertext,
        key_version=row.key_version,
        enrolled_at=row.enrolled_at,
        refusals=row.refusals,
        replays=row.replays,
    )
