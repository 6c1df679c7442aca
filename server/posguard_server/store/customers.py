"""Storage of customers, their numbers, per-prefix counters, external IDs and verification failures.

Numbers stay unique across processes and replicas by construction: the issuances of a transaction take the
next values of their prefix's counter with one atomic ``UPDATE … RETURNING`` (the row lock serialises
concurrent issuers), and a unique index on the number backs it up. New customers are issued in batches by
``store.issuance``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    bindparam,
    func,
    select,
    update,
)
from sqlalchemy.orm import Mapped, mapped_column

from posguard_server.domain.audit_report import AuditReport, NumberActivity, close_pairs
from posguard_server.domain.customers import (
    Customer,
    CustomerNumber,
    ExternalRef,
    NumberKind,
    NumberStatus,
    Transition,
    mask,
    next_status,
)
from posguard_server.domain.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from posguard_server.store.audit import append_event
from posguard_server.store.caller_limits import SqlCallerFailures
from posguard_server.store.driver import DriverConnection, Later
from posguard_server.store.idempotency import (
    earlier_call,
    record_call,
)
from posguard_server.store.schema import Base, insert_for

if TYPE_CHECKING:
    from sqlalchemy import Select, Table
    from sqlalchemy.orm import Session

    from posguard_server.store.db import Database
    from posguard_server.store.driver import Runs

NUMBER_MAX = 40
CUSTOMER_ID_MAX = 32
ISSUER_MAX = 32
REASON_MAX = 500
NAMESPACE_MAX = 64
EXTERNAL_VALUE_MAX = 256
FINGERPRINT_MAX = 64


class SqlNumberCounter(Base):
    """The next counter value of one prefix (country + region + institution [+ merchant])."""

    __tablename__ = "number_counters"

    prefix: Mapped[str] = mapped_column(String(32), primary_key=True)
    next_value: Mapped[int] = mapped_column(BigInteger)


class SqlCustomer(Base):
    __tablename__ = "customers"
    __table_args__ = (UniqueConstraint("request_id", "created_by"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    customer_id: Mapped[str] = mapped_column(String(CUSTOMER_ID_MAX), unique=True)
    issuer: Mapped[str] = mapped_column(String(ISSUER_MAX), index=True)
    created_at: Mapped[datetime] = mapped_column(index=True)
    updated_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(64))
    # AES-GCM ciphertext of the holder's details (see HolderCipher); never plain text in the database.
    holder_ciphertext: Mapped[bytes | None] = mapped_column(LargeBinary)
    holder_key_version: Mapped[int | None] = mapped_column(Integer)
    # The IssueCustomerId call that made the customer: a request_id is unique per caller (created_by).
    request_id: Mapped[str | None] = mapped_column(String(128))
    request_fingerprint: Mapped[str | None] = mapped_column(String(FINGERPRINT_MAX))


class SqlCustomerNumber(Base):
    __tablename__ = "customer_numbers"
    __table_args__ = (
        CheckConstraint("status IN ('active', 'suspended', 'revoked', 'rotated')", name="status"),
        CheckConstraint("kind IN ('static', 'sub')", name="kind"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    number: Mapped[str] = mapped_column(String(NUMBER_MAX), unique=True)
    customer_id: Mapped[str] = mapped_column(
        String(CUSTOMER_ID_MAX), ForeignKey("customers.customer_id"), index=True
    )
    kind: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16), index=True)
    issuer: Mapped[str] = mapped_column(String(ISSUER_MAX))
    prefix: Mapped[str] = mapped_column(String(32))
    counter: Mapped[int] = mapped_column(BigInteger)
    key_version: Mapped[int] = mapped_column(Integer)
    issued_at: Mapped[datetime]
    status_changed_at: Mapped[datetime]
    status_changed_by: Mapped[str] = mapped_column(String(64))
    status_reason: Mapped[str] = mapped_column(String(REASON_MAX), default="")
    successor_number: Mapped[str | None] = mapped_column(String(NUMBER_MAX))
    primary_number: Mapped[str | None] = mapped_column(String(NUMBER_MAX))
    scope_merchant_id: Mapped[str | None] = mapped_column(String(64))
    scope_channel: Mapped[str | None] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(String(100))
    verifications: Mapped[int] = mapped_column(BigInteger, default=0)
    failed_verifications: Mapped[int] = mapped_column(BigInteger, default=0)
    last_verified_at: Mapped[datetime | None]


class SqlExternalId(Base):
    __tablename__ = "external_ids"
    __table_args__ = (UniqueConstraint("namespace", "value"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    namespace: Mapped[str] = mapped_column(String(NAMESPACE_MAX))
    value: Mapped[str] = mapped_column(String(EXTERNAL_VALUE_MAX))
    customer_id: Mapped[str] = mapped_column(
        String(CUSTOMER_ID_MAX), ForeignKey("customers.customer_id"), index=True
    )
    linked_at: Mapped[datetime]


class SqlVerificationFailure(Base):
    """Failed verifications counted per caller and per presented number (also numbers never issued)."""

    __tablename__ = "verification_failures"

    scope: Mapped[str] = mapped_column(String(8), primary_key=True)  # "caller" or "number"
    subject: Mapped[str] = mapped_column(String(NUMBER_MAX), primary_key=True)
    failures: Mapped[int] = mapped_column(BigInteger)
    last_failed_at: Mapped[datetime]


# (prefix, counter) → (number, key version that made it)
MakeNumber = Callable[[str, int], tuple[str, int]]


class Allocated(NamedTuple):
    """A number made from its prefix's counter and not in use, with the counter and the key version."""

    number: str
    counter: int
    key_version: int


TRANSITION_ACTIONS = {
    Transition.SUSPEND: "customer.suspended",
    Transition.REACTIVATE: "customer.reactivated",
    Transition.REVOKE: "customer.revoked",
    Transition.ROTATE: "customer.rotated",
}


@dataclass(frozen=True, slots=True)
class NewCustomer:
    """A customer to issue (``store.issuance``); its number is made from the counter in the transaction."""

    customer_id: str
    issuer: str
    prefix: str
    holder_ciphertext: bytes | None
    holder_key_version: int | None
    external_ids: Sequence[ExternalRef]


@dataclass(frozen=True, slots=True)
class StoredCustomer:
    """A customer as stored: the domain object plus the encrypted holder details, decrypted by the caller."""

    customer: Customer
    holder_ciphertext: bytes | None
    holder_key_version: int | None


@dataclass(frozen=True, slots=True)
class CustomerLookup:
    """A customer named by one of: its id, one of its numbers (canonical form), a linked external id."""

    customer_id: str | None = None
    number: str | None = None
    external: ExternalRef | None = None


class SqlCustomerStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    # -- reading --------------------------------------------------------------------------------------

    def find_number(self, number: str) -> tuple[CustomerNumber, str] | None:
        """The stored number and its customer id, or None when it was never issued."""
        with self._db.session(read_only=True) as session:
            row = session.scalar(select(SqlCustomerNumber).where(SqlCustomerNumber.number == number))
            return (number_of_row(row), row.customer_id) if row is not None else None

    def get(
        self,
        *,
        customer_id: str | None = None,
        number: str | None = None,
        external: ExternalRef | None = None,
    ) -> StoredCustomer:
        """The customer named by its id, one of its numbers or a linked external id; NotFound otherwise."""
        found = self.get_many([CustomerLookup(customer_id, number, external)])[0]
        if isinstance(found, NotFound):
            raise found
        return found

    def get_many(self, lookups: Sequence[CustomerLookup]) -> list[StoredCustomer | NotFound]:
        """Each lookup's customer, or NotFound, in one read-only transaction through the driver.

        The lookups of concurrent GetCustomer and ResolveExternalId calls are read together
        (``api.group_commit``), in two steps of Core statements sent together (a round trip each on
        PostgreSQL): the numbers and external ids named, then the customers they lead to with their numbers
        and external ids.
        """
        with self._db.statements_unit(read_only=True) as connection:
            named_numbers = {k.number for k in lookups if k.number is not None}
            named_externals = {k.external for k in lookups if k.external is not None}
            with connection.together():
                numbers = numbers_later(connection, named_numbers)
                externals = externals_later(connection, named_externals)
            by_number, by_external = numbers.get(), externals.get()
            named: list[str | None] = []
            for lookup in lookups:
                if lookup.number is not None:
                    owner = by_number.get(lookup.number)
                    named.append(owner[1] if owner is not None else None)
                elif lookup.external is not None:
                    named.append(by_external.get(lookup.external))
                else:
                    named.append(lookup.customer_id)
            with connection.together():
                customers = customers_later(connection, {c for c in named if c is not None})
            found = customers.get()
            return [(found.get(c) if c is not None else None) or _no_customer() for c in named]

    def primary_of_external(self, ref: ExternalRef) -> tuple[str, NumberStatus]:
        """The customer an external id is linked to and the status of its primary number, in one read."""
        with self._db.session(read_only=True) as session:
            row = session.execute(
                select(SqlExternalId.customer_id, SqlCustomerNumber.status)
                .join(SqlCustomerNumber, SqlCustomerNumber.customer_id == SqlExternalId.customer_id)
                .where(
                    SqlExternalId.namespace == ref.namespace,
                    SqlExternalId.value == ref.value,
                    # The primary is the static number that has not been replaced.
                    SqlCustomerNumber.kind == NumberKind.STATIC.value,
                    SqlCustomerNumber.successor_number.is_(None),
                )
            ).first()
            if row is None:
                raise NotFound("no such customer", reason="CUSTOMER_NOT_FOUND")
            return row.customer_id, NumberStatus(row.status)

    def list(
        self,
        *,
        status: NumberStatus | None,
        issuer: str | None,
        created_after: datetime | None,
        created_before: datetime | None,
        limit: int,
        after: int | None,
    ) -> tuple[list[StoredCustomer], int | None]:
        with self._db.session(read_only=True) as session:
            query = select(SqlCustomer).order_by(SqlCustomer.id).limit(limit + 1)
            if after is not None:
                query = query.where(SqlCustomer.id > after)
            if issuer:
                query = query.where(SqlCustomer.issuer == issuer)
            if created_after is not None:
                query = query.where(SqlCustomer.created_at >= created_after)
            if created_before is not None:
                query = query.where(SqlCustomer.created_at < created_before)
            if status is not None:
                primaries = select(SqlCustomerNumber.customer_id).where(
                    SqlCustomerNumber.kind == NumberKind.STATIC.value,
                    SqlCustomerNumber.successor_number.is_(None),
                    SqlCustomerNumber.status == status.value,
                )
                query = query.where(SqlCustomer.customer_id.in_(primaries))
            rows = list(session.scalars(query))
            more = len(rows) > limit
            rows = rows[:limit]
            loaded = customers_in(session.connection(), [r.customer_id for r in rows])
            return [loaded[r.customer_id] for r in rows], (rows[-1].id if more and rows else None)

    # -- lifecycle ------------------------------------------------------------------------------------

    def transition(
        self,
        number: str,
        action: Transition,
        *,
        reason: str,
        request_id: str,
        fingerprint: str,
        actor: str,
        now: datetime,
        make_number: MakeNumber,
    ) -> tuple[StoredCustomer, str, bool]:
        """Apply ``action`` to a primary number; ``(customer, previous number, replayed)``.

        Rotation issues the successor under the same prefix with ``make_number``. A retry with the same
        ``request_id`` and ``fingerprint`` changes nothing and returns the customer as it is now.
        """
        method = TRANSITION_ACTIONS[action]
        with self._db.session() as session:
            # Lock first, then look for an earlier run: a concurrent retry waits here and then replays.
            row = _lock_number(session, number)
            done = earlier_call(session, method, actor, request_id, fingerprint)
            if done is not None:
                customer = session.scalar(
                    select(SqlCustomer).where(SqlCustomer.customer_id == done.customer_id)
                )
                assert customer is not None
                return _load(session, customer), number, True
            customer_id, details = apply_transition(
                session, row, action, reason=reason, actor=actor, now=now, make_number=make_number
            )
            customer = session.scalar(select(SqlCustomer).where(SqlCustomer.customer_id == customer_id))
            assert customer is not None
            record_call(session, method, actor, request_id, fingerprint, customer_id=customer_id, now=now)
            append_event(session, actor=actor, action=method, subject=mask(number), details=details, now=now)
            session.flush()
            return _load(session, customer), number, False

    # -- sub numbers and external ids ------------------------------------------------------------------

    def issue_sub(
        self,
        primary_number: str,
        *,
        merchant_id: str,
        channel: str,
        label: str,
        request_id: str,
        fingerprint: str,
        actor: str,
        now: datetime,
        make_number: MakeNumber,
    ) -> tuple[CustomerNumber, str, bool]:
        """Issue a sub number under an active primary; ``(sub, customer_id, replayed)``."""
        method = "customer.sub_issued"
        with self._db.session() as session:
            primary = _lock_number(session, primary_number)
            done = earlier_call(session, method, actor, request_id, fingerprint)
            if done is not None:
                earlier = session.scalar(
                    select(SqlCustomerNumber).where(SqlCustomerNumber.number == done.result_number)
                )
                assert earlier is not None
                return number_of_row(earlier), done.customer_id, True
            if primary is None:
                raise NotFound("no customer has this number", reason="NUMBER_NOT_FOUND")
            if primary.kind != NumberKind.STATIC.value or primary.successor_number is not None:
                raise FailedPrecondition(
                    "only a current primary number can have sub numbers", reason="NOT_A_PRIMARY"
                )
            if primary.status != NumberStatus.ACTIVE.value:
                raise FailedPrecondition(
                    f"cannot issue a sub number under a {primary.status} number", reason="PRIMARY_NOT_ACTIVE"
                )
            number, counter, key_version = _allocate(session, primary.prefix, make_number)
            row = SqlCustomerNumber(
                number=number,
                counter=counter,
                customer_id=primary.customer_id,
                kind=NumberKind.SUB.value,
                status=NumberStatus.ACTIVE.value,
                issuer=primary.issuer,
                prefix=primary.prefix,
                key_version=key_version,
                issued_at=now,
                status_changed_at=now,
                status_changed_by=actor,
                status_reason="issued",
                primary_number=primary.number,
                scope_merchant_id=merchant_id or None,
                scope_channel=channel or None,
                label=label or None,
                verifications=0,
                failed_verifications=0,
            )
            session.add(row)
            record_call(
                session,
                method,
                actor,
                request_id,
                fingerprint,
                customer_id=primary.customer_id,
                result_number=number,
                now=now,
            )
            details = {"customer_id": primary.customer_id, "primary": mask(primary.number)}
            if merchant_id:
                details["merchant_id"] = merchant_id
            if channel:
                details["channel"] = channel
            append_event(session, actor=actor, action=method, subject=mask(number), details=details, now=now)
            session.flush()
            return number_of_row(row), primary.customer_id, False

    def primary_status(self, customer_id: str) -> CustomerNumber:
        """The customer's current primary number (what a sub number stands for)."""
        with self._db.session(read_only=True) as session:
            row = session.scalar(
                select(SqlCustomerNumber).where(
                    SqlCustomerNumber.customer_id == customer_id,
                    SqlCustomerNumber.kind == NumberKind.STATIC.value,
                    SqlCustomerNumber.successor_number.is_(None),
                )
            )
            assert row is not None
            return number_of_row(row)

    def link_external(
        self,
        ref: ExternalRef,
        *,
        customer_id: str | None,
        number: str | None,
        request_id: str,
        fingerprint: str,
        actor: str,
        now: datetime,
    ) -> tuple[str, bool]:
        """Link an external id to a customer; ``(customer_id, replayed)``. Unique per namespace."""
        method = "external_id.linked"
        with self._db.session() as session:
            done = earlier_call(session, method, actor, request_id, fingerprint)
            if done is not None:
                return done.customer_id, True
            customer = _find_customer(session, customer_id=customer_id, number=number, external=None)
            owner = session.scalar(
                select(SqlExternalId.customer_id).where(
                    SqlExternalId.namespace == ref.namespace, SqlExternalId.value == ref.value
                )
            )
            if owner is not None and owner != customer.customer_id:
                raise AlreadyExists(
                    "this external id is already linked to another customer",
                    reason="EXTERNAL_ID_TAKEN",
                    metadata={"namespace": ref.namespace},
                )
            replayed = owner is not None
            if not replayed:
                session.add(
                    SqlExternalId(
                        namespace=ref.namespace,
                        value=ref.value,
                        customer_id=customer.customer_id,
                        linked_at=now,
                    )
                )
                append_event(
                    session,
                    actor=actor,
                    action=method,
                    subject=customer.customer_id,
                    details={"namespace": ref.namespace},
                    now=now,
                )
            record_call(
                session, method, actor, request_id, fingerprint, customer_id=customer.customer_id, now=now
            )
            return customer.customer_id, replayed

    # -- verification signals -------------------------------------------------------------------------

    def failures(self, scope: str, subject: str) -> int:
        with self._db.session(read_only=True) as session:
            row = session.get(SqlVerificationFailure, (scope, subject))
            return row.failures if row is not None else 0


# -- helpers ------------------------------------------------------------------------------------------


_counters = cast("Table", SqlNumberCounter.__table__)
# A prefix's counters are taken by moving its next value, then reading it back in the same transaction (the
# UPDATE locks the row): two statements rather than ``UPDATE … RETURNING``, so that they run through the
# driver as well as through a session.
_TAKE_COUNTERS = (
    update(_counters)
    .where(_counters.c.prefix == bindparam("b_prefix"))
    .values(next_value=_counters.c.next_value + bindparam("b_count"))
)
_NEXT_VALUE = select(_counters.c.next_value).where(_counters.c.prefix == bindparam("b_prefix"))


@functools.cache
def _add_counters(dialect: str) -> Any:
    return insert_for(dialect)(_counters).on_conflict_do_nothing()


def _together(connection: Runs) -> AbstractContextManager[None]:
    """Send the block's statements together through the driver (``DriverConnection.together``); a Core
    connection runs each as it is given."""
    return connection.together() if isinstance(connection, DriverConnection) else contextlib.nullcontext()


class SerialSpaceUsedUp(Exception):
    """``allocate_numbers`` could not make the number of ``wanted[slot]``: its prefix has none left."""

    def __init__(self, slot: int, error: FailedPrecondition) -> None:
        super().__init__(str(error))
        self.slot = slot
        self.error = error


def allocate_numbers(connection: Runs, wanted: Sequence[tuple[str, MakeNumber]]) -> list[Allocated]:
    """For each ``(prefix, make_number)`` in order, the prefix's next unused number.

    Raises ``SerialSpaceUsedUp`` naming the first one whose prefix has no number left (the transaction must
    then be rolled back: its counters were taken).

    A prefix's counters are taken by one ``UPDATE`` per prefix and round (its row stays locked until the
    transaction ends, so concurrent issuers of a prefix take turns), in prefix order, and the numbers made
    from them are checked for use in one read. Through the driver, each round's statements are sent together.
    """
    found: dict[int, Allocated] = {}
    pending = list(range(len(wanted)))
    # A prefix's counters row is made on its first use, with the first round's statements.
    add_counters = [{"prefix": p, "next_value": 0} for p in sorted({prefix for prefix, _ in wanted})]
    while pending:
        by_prefix: dict[str, list[int]] = {}
        for slot in pending:
            by_prefix.setdefault(wanted[slot][0], []).append(slot)
        made: dict[int, Allocated] = {}
        taken = sorted(by_prefix.items())
        with _together(connection):
            if add_counters:
                connection.execute(_add_counters(connection.dialect.name), add_counters)
                add_counters = []
            for prefix, slots in taken:
                connection.execute(_TAKE_COUNTERS, {"b_prefix": prefix, "b_count": len(slots)})
            next_values = [connection.execute(_NEXT_VALUE, {"b_prefix": prefix}) for prefix, _ in taken]
        for (prefix, slots), next_value in zip(taken, next_values, strict=True):
            last = next_value.one()[0]
            for counter, slot in enumerate(slots, start=int(last) - len(slots)):
                try:
                    number, key_version = wanted[slot][1](prefix, counter)
                except FailedPrecondition as used_up:
                    raise SerialSpaceUsedUp(slot, used_up) from None
                made[slot] = Allocated(number, counter, key_version)
        # Within one key version FF1 is a permutation, so counters never repeat a number. After a key rotation
        # the new permutation may hit a number an older key made; skipping that counter keeps numbers unique.
        used = set(numbers_in(connection, {a.number for a in made.values()}))
        used.update(a.number for a in found.values())
        pending = []
        for slot, allocated in sorted(made.items()):
            if allocated.number in used:
                pending.append(slot)
            else:
                found[slot] = allocated
                used.add(allocated.number)
    return [found[slot] for slot in range(len(wanted))]


def static_number_columns(
    customer_id: str, issuer: str, prefix: str, allocated: Allocated, actor: str, now: datetime, reason: str
) -> dict[str, Any]:
    """The columns of a new primary number of a customer (a fresh customer's, or a rotation's successor)."""
    return {
        "number": allocated.number,
        "counter": allocated.counter,
        "customer_id": customer_id,
        "kind": NumberKind.STATIC.value,
        "status": NumberStatus.ACTIVE.value,
        "issuer": issuer,
        "prefix": prefix,
        "key_version": allocated.key_version,
        "issued_at": now,
        "status_changed_at": now,
        "status_changed_by": actor,
        "status_reason": reason,
        "verifications": 0,
        "failed_verifications": 0,
    }


def _allocate(session: Session, prefix: str, make_number: MakeNumber) -> Allocated:
    """The prefix's next unused number, in the session's transaction; FailedPrecondition when none is left."""
    session.flush()  # what the unit of work holds, for the Core statements of the allocation
    try:
        return allocate_numbers(session.connection(), [(prefix, make_number)])[0]
    except SerialSpaceUsedUp as used_up:
        raise used_up.error from None


def _add_static_number(
    session: Session,
    customer_id: str,
    issuer: str,
    prefix: str,
    make_number: MakeNumber,
    actor: str,
    now: datetime,
    *,
    reason: str,
) -> str:
    """Issue the prefix's next number to a customer as its (new) primary."""
    allocated = _allocate(session, prefix, make_number)
    session.add(
        SqlCustomerNumber(**static_number_columns(customer_id, issuer, prefix, allocated, actor, now, reason))
    )
    return allocated.number


def _lock_number(session: Session, number: str) -> SqlCustomerNumber | None:
    return session.scalar(
        select(SqlCustomerNumber).where(SqlCustomerNumber.number == number).with_for_update()
    )


def lock_number(session: Session, number: str) -> SqlCustomerNumber | None:
    """The number's row, locked until the caller's transaction ends; None when no such number exists."""
    return _lock_number(session, number)


def apply_transition(
    session: Session,
    row: SqlCustomerNumber | None,
    action: Transition,
    *,
    reason: str,
    actor: str,
    now: datetime,
    make_number: MakeNumber,
) -> tuple[str, dict[str, str]]:
    """Apply ``action`` to a locked primary number row in the caller's transaction: the one definition of a
    lifecycle change (RotateCustomerId and its kin, and a review case that rotates a number).

    Returns the customer id and the details of the audit event the caller appends (action
    ``TRANSITION_ACTIONS[action]``, subject the masked number) as its last write. Rotation issues the
    successor under the same prefix with ``make_number``.
    """
    if row is None:
        raise NotFound("no customer has this number", reason="NUMBER_NOT_FOUND")
    if row.kind != NumberKind.STATIC.value:
        raise InvalidArgument.field("number", "must be a primary number, not a sub number")
    target = next_status(NumberStatus(row.status), action)
    row.status = target.value
    row.status_reason = reason
    row.status_changed_at = now
    row.status_changed_by = actor
    details = {"customer_id": row.customer_id, "reason": reason}
    if action is Transition.ROTATE:
        new_number = _add_static_number(
            session, row.customer_id, row.issuer, row.prefix, make_number, actor, now, reason=reason
        )
        row.successor_number = new_number
        # Sub numbers hang off whichever number is the customer's primary now.
        session.execute(
            update(SqlCustomerNumber)
            .where(
                SqlCustomerNumber.customer_id == row.customer_id,
                SqlCustomerNumber.kind == NumberKind.SUB.value,
            )
            .values(primary_number=new_number)
        )
        details["successor"] = mask(new_number)
    session.execute(
        update(SqlCustomer).where(SqlCustomer.customer_id == row.customer_id).values(updated_at=now)
    )
    return row.customer_id, details


def _find_customer(
    session: Session, *, customer_id: str | None, number: str | None, external: ExternalRef | None
) -> SqlCustomer:
    if number is not None:
        customer_id = session.scalar(
            select(SqlCustomerNumber.customer_id).where(SqlCustomerNumber.number == number)
        )
    elif external is not None:
        customer_id = session.scalar(
            select(SqlExternalId.customer_id).where(
                SqlExternalId.namespace == external.namespace, SqlExternalId.value == external.value
            )
        )
    row = (
        session.scalar(select(SqlCustomer).where(SqlCustomer.customer_id == customer_id))
        if customer_id is not None
        else None
    )
    if row is None:
        raise NotFound("no such customer", reason="CUSTOMER_NOT_FOUND")
    return row


# -- reads inside another store's transaction (scoring resolves its customers in its own) --------------


# The scoring path's reads, as Core statements built once: rows, not ORM objects, and no identity map.
_NUMBERS_IN = select(SqlCustomerNumber.__table__).where(
    SqlCustomerNumber.number.in_(bindparam("numbers", expanding=True))
)
# A customer's primary number among the customers named: the static number that has not been replaced.
_PRIMARY_OF = (
    SqlCustomerNumber.customer_id.in_(bindparam("customers", expanding=True)),
    SqlCustomerNumber.kind == NumberKind.STATIC.value,
    SqlCustomerNumber.successor_number.is_(None),
)
_PRIMARIES_IN = select(SqlCustomerNumber.__table__).where(*_PRIMARY_OF)
_PRIMARY_STATES_IN = select(
    SqlCustomerNumber.customer_id, SqlCustomerNumber.number, SqlCustomerNumber.status
).where(*_PRIMARY_OF)
_EXTERNALS_IN = select(SqlExternalId.value, SqlExternalId.customer_id).where(
    SqlExternalId.namespace == bindparam("namespace"),
    SqlExternalId.value.in_(bindparam("values", expanding=True)),
)
_CUSTOMERS_IN = select(
    SqlCustomer.customer_id,
    SqlCustomer.created_at,
    SqlCustomer.updated_at,
    SqlCustomer.holder_ciphertext,
    SqlCustomer.holder_key_version,
).where(SqlCustomer.customer_id.in_(bindparam("customers", expanding=True)))
_NUMBERS_OF = (
    select(SqlCustomerNumber.__table__)
    .where(SqlCustomerNumber.customer_id.in_(bindparam("customers", expanding=True)))
    .order_by(SqlCustomerNumber.id)
)
_EXTERNALS_OF = (
    select(SqlExternalId.customer_id, SqlExternalId.namespace, SqlExternalId.value)
    .where(SqlExternalId.customer_id.in_(bindparam("customers", expanding=True)))
    .order_by(SqlExternalId.id)
)


def numbers_in(connection: Runs, numbers: Collection[str]) -> dict[str, tuple[CustomerNumber, str]]:
    """The stored numbers among ``numbers``, each with its customer id."""
    return numbers_later(connection, numbers).get()


def numbers_later(connection: Runs, numbers: Collection[str]) -> Later[dict[str, tuple[CustomerNumber, str]]]:
    """``numbers_in``, sent now and read when asked for (``DriverConnection.together``)."""
    if not numbers:
        return Later.known({})
    rows = connection.execute(_NUMBERS_IN, {"numbers": sorted(numbers)})
    return Later(
        lambda: {row.number: (number_of_row(cast(SqlCustomerNumber, row)), row.customer_id) for row in rows}
    )


def primaries_in(connection: Runs, customer_ids: Collection[str]) -> dict[str, CustomerNumber]:
    """Each customer's current primary number (the static number that has not been replaced)."""
    return primaries_later(connection, customer_ids).get()


def primaries_later(connection: Runs, customer_ids: Collection[str]) -> Later[dict[str, CustomerNumber]]:
    """``primaries_in``, sent now and read when asked for."""
    if not customer_ids:
        return Later.known({})
    rows = connection.execute(_PRIMARIES_IN, {"customers": sorted(customer_ids)})
    return Later(lambda: {row.customer_id: number_of_row(cast(SqlCustomerNumber, row)) for row in rows})


def primary_states_in(connection: Runs, customer_ids: Collection[str]) -> dict[str, tuple[str, NumberStatus]]:
    """Each customer's current primary number and its status: what a redemption's judgment reads of it,
    without decoding the rest of the row (its times, scope and label) for every call of a batch."""
    if not customer_ids:
        return {}
    rows = connection.execute(_PRIMARY_STATES_IN, {"customers": sorted(customer_ids)})
    return {row.customer_id: (row.number, NumberStatus(row.status)) for row in rows}


def externals_in(connection: Runs, refs: Collection[ExternalRef]) -> dict[ExternalRef, str]:
    """The customer each linked external id among ``refs`` names."""
    return externals_later(connection, refs).get()


def externals_later(connection: Runs, refs: Collection[ExternalRef]) -> Later[dict[ExternalRef, str]]:
    """``externals_in``, sent now and read when asked for."""
    sent = []
    for namespace in sorted({ref.namespace for ref in refs}):
        values = sorted(ref.value for ref in refs if ref.namespace == namespace)
        sent.append(
            (namespace, connection.execute(_EXTERNALS_IN, {"namespace": namespace, "values": values}))
        )

    def found() -> dict[ExternalRef, str]:
        return {
            ExternalRef(namespace, value): customer_id
            for namespace, rows in sent
            for value, customer_id in rows
        }

    return Later(found)


def number_of_row(row: SqlCustomerNumber) -> CustomerNumber:
    # Also given Core rows (cast to the class): they have the same attribute names.
    return CustomerNumber(
        number=row.number,
        kind=NumberKind(row.kind),
        status=NumberStatus(row.status),
        issuer=row.issuer,
        key_version=row.key_version,
        issued_at=row.issued_at,
        status_changed_at=row.status_changed_at,
        status_reason=row.status_reason or "",
        successor_number=row.successor_number or "",
        primary_number=row.primary_number or "",
        scope_merchant_id=row.scope_merchant_id or "",
        scope_channel=row.scope_channel or "",
        label=row.label or "",
    )


def _load(session: Session, row: SqlCustomer) -> StoredCustomer:
    session.flush()  # what this unit of work changed, for the Core reads below
    return customers_in(session.connection(), [row.customer_id])[row.customer_id]


def customers_in(connection: Runs, customer_ids: Collection[str]) -> dict[str, StoredCustomer]:
    """The stored customers among ``customer_ids``, with their numbers and external ids: three reads."""
    return customers_later(connection, customer_ids).get()


def customers_later(connection: Runs, customer_ids: Collection[str]) -> Later[dict[str, StoredCustomer]]:
    """``customers_in``, sent now and read when asked for (``DriverConnection.together``)."""
    if not customer_ids:
        return Later.known({})
    ids = {"customers": sorted(set(customer_ids))}
    number_rows = connection.execute(_NUMBERS_OF, ids)
    external_rows = connection.execute(_EXTERNALS_OF, ids)
    customer_rows = connection.execute(_CUSTOMERS_IN, ids)

    def found() -> dict[str, StoredCustomer]:
        numbers: dict[str, list[CustomerNumber]] = {}
        for row in number_rows:
            numbers.setdefault(row.customer_id, []).append(number_of_row(cast(SqlCustomerNumber, row)))
        externals: dict[str, list[ExternalRef]] = {}
        for row in external_rows:
            externals.setdefault(row.customer_id, []).append(ExternalRef(row.namespace, row.value))
        stored: dict[str, StoredCustomer] = {}
        for row in customer_rows:
            own = numbers.get(row.customer_id, [])
            # The primary is the static number that has not been replaced; rotation chains end there.
            primary = next(n for n in reversed(own) if n.kind is NumberKind.STATIC and not n.successor_number)
            customer = Customer(
                customer_id=row.customer_id,
                primary=primary,
                created_at=row.created_at,
                updated_at=row.updated_at,
                sub_numbers=tuple(n for n in own if n.kind is NumberKind.SUB),
                external_ids=tuple(externals.get(row.customer_id, ())),
            )
            stored[row.customer_id] = StoredCustomer(customer, row.holder_ciphertext, row.holder_key_version)
        return stored

    return Later(found)


def _no_customer() -> NotFound:
    return NotFound("no such customer", reason="CUSTOMER_NOT_FOUND")


def build_audit_report(
    database: Database,
    *,
    alphabet_of: Callable[[str], str],
    now: datetime,
    dormant_before: datetime,
    top: int,
) -> AuditReport:
    """Read what the audit job reports; ``alphabet_of(issuer)`` gives the symbols of an issuer's numbers."""
    with database.session(read_only=True) as session:
        duplicates = [
            (number, int(n))
            for number, n in session.execute(
                select(SqlCustomerNumber.number, func.count())
                .group_by(SqlCustomerNumber.number)
                .having(func.count() > 1)
            )
        ]
        by_issuer: dict[str, list[str]] = {}
        owner: dict[str, str] = {}
        rows = session.execute(
            select(SqlCustomerNumber.number, SqlCustomerNumber.issuer, SqlCustomerNumber.customer_id)
        )
        for number, issuer, customer_id in rows:
            by_issuer.setdefault(issuer, []).append(number)
            owner[number] = customer_id
        pairs = [
            pair
            for issuer, numbers in by_issuer.items()
            for pair in close_pairs(numbers, alphabet_of(issuer))
        ]

        def activity(query: Select[SqlCustomerNumber]) -> list[NumberActivity]:
            return [
                NumberActivity(
                    number=mask(row.number),
                    status=row.status,
                    verifications=row.verifications,
                    failed_verifications=row.failed_verifications,
                    issued_at=row.issued_at,
                    last_verified_at=row.last_verified_at,
                )
                for row in session.scalars(query.limit(top))
            ]

        numbers = select(SqlCustomerNumber)
        return AuditReport(
            generated_at=now,
            numbers_checked=sum(len(v) for v in by_issuer.values()),
            duplicates=duplicates,
            # Masks of such a pair look alike; the customer ids tell the operator which records to open.
            one_keystroke_apart=[(f"{mask(a)} {owner[a]}", f"{mask(b)} {owner[b]}") for a, b in pairs],
            most_verified=activity(
                numbers.where(SqlCustomerNumber.verifications > 0).order_by(
                    SqlCustomerNumber.verifications.desc(), SqlCustomerNumber.id
                )
            ),
            most_failed=activity(
                numbers.where(SqlCustomerNumber.failed_verifications > 0).order_by(
                    SqlCustomerNumber.failed_verifications.desc(), SqlCustomerNumber.id
                )
            ),
            failing_callers=[
                (row.subject, row.failures)
                for row in session.scalars(
                    select(SqlVerificationFailure)
                    .where(SqlVerificationFailure.scope == "caller")
                    .order_by(SqlVerificationFailure.failures.desc())
                    .limit(top)
                )
            ],
            refused_callers=[
                (row.caller, row.times_refused, row.last_refused_at)
                for row in session.scalars(
                    select(SqlCallerFailures)
                    .where(SqlCallerFailures.times_refused > 0)
                    .order_by(SqlCallerFailures.last_refused_at.desc())
                    .limit(top)
                )
                if row.last_refused_at is not None
            ],
            # Active numbers nobody has presented since ``dormant_before`` (or ever, if issued before it).
            dormant=activity(
                numbers.where(
                    SqlCustomerNumber.status == NumberStatus.ACTIVE.value,
                    func.coalesce(SqlCustomerNumber.last_verified_at, SqlCustomerNumber.issued_at)
                    < dormant_before,
                ).order_by(func.coalesce(SqlCustomerNumber.last_verified_at, SqlCustomerNumber.issued_at))
            ),
        )
