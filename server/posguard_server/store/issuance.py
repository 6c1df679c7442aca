"""IssueCustomerId in batches of concurrent calls, a batch per database transaction.

A batch (``api.group_commit``, on the database's writer threads) reads what decides it in a few statements
(the customers its callers' request_ids already made, the external ids it names), judges each call in order
in memory (a retry of an earlier call of the batch replays it, an external id claimed by an earlier call is
taken), takes the counters of the numbers it issues with one ``UPDATE`` per prefix, and writes the batch with
one executemany per table and one audit append. The statements are SQLAlchemy Core, built once, run through
the driver (``Database.statements_unit``: no ORM session), each step's sent together on PostgreSQL.

A call whose request_id another transaction (another writer thread or process) commits at the same moment
loses the race on the unique index without failing the batch (``ON CONFLICT DO NOTHING``): it replays the
winner's customer. An external id claimed by another transaction at the same moment fails the batch, which
is re-run and then refuses that call alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import bindparam, insert, select

from posguard_server.domain.customers import (
    Customer,
    CustomerNumber,
    NumberKind,
    NumberStatus,
    mask,
)
from posguard_server.domain.errors import AlreadyExists
from posguard_server.store.audit import NewEvent, append_events
from posguard_server.store.customers import (
    MakeNumber,
    NewCustomer,
    SerialSpaceUsedUp,
    SqlCustomer,
    SqlCustomerNumber,
    SqlExternalId,
    StoredCustomer,
    allocate_numbers,
    customers_in,
    externals_later,
    static_number_columns,
)
from posguard_server.store.db import rerun_on_conflict
from posguard_server.store.idempotency import idempotency_conflict
from posguard_server.store.schema import insert_for

if TYPE_CHECKING:
    from sqlalchemy import Table

    from posguard_server.store.db import Database
    from posguard_server.store.driver import DriverConnection

ISSUED = "customer.issued"  # the audit action


@dataclass(frozen=True, slots=True)
class Issuance:
    """One IssueCustomerId call: the customer to make, how its issuer makes numbers, and the call's key."""

    new: NewCustomer
    make_number: MakeNumber
    request_id: str
    fingerprint: str
    actor: str
    now: datetime


@dataclass(frozen=True, slots=True)
class Issued:
    """The customer a call made, or (``replayed``) the one an earlier call with its request_id made."""

    stored: StoredCustomer
    replayed: bool


_customers = cast("Table", SqlCustomer.__table__)
_C = _customers.c
# The customers made under the request_ids of a batch (of any caller: filtered by caller in memory).
_EARLIER = select(_C.customer_id, _C.request_id, _C.created_by, _C.request_fingerprint).where(
    _C.request_id.in_(bindparam("request_ids", expanding=True))
)
_ADD_NUMBERS = insert(cast("Table", SqlCustomerNumber.__table__))
_ADD_EXTERNALS = insert(cast("Table", SqlExternalId.__table__))


# Which of a batch's new customers are in (its own, when another transaction took a request_id meanwhile).
_MADE = select(_C.customer_id).where(_C.customer_id.in_(bindparam("customer_ids", expanding=True)))


class SqlIssuanceStore:
    def __init__(self, database: Database) -> None:
        self._db = database
        # Customers whose (caller, request_id) another transaction committed meanwhile are left out, not
        # an error: those calls replay the other transaction's customer.
        self._add_customers = insert_for(database.dialect)(_customers).on_conflict_do_nothing(
            index_elements=[_C.request_id, _C.created_by]
        )

    def issue(self, item: Issuance) -> Issued:
        """Issue one customer (a batch of one); its error is raised."""
        result = self.issue_many([item])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def issue_many(self, items: Sequence[Issuance]) -> list[Issued | Exception]:
        """Issue a batch of concurrent calls in one transaction, in order; one result per item.

        A retry of an earlier call (the caller's request_id and the same fingerprint), in an earlier
        transaction or earlier in this batch, replays the customer that call made; with another fingerprint
        it is an ``InvalidArgument`` (IDEMPOTENCY_CONFLICT). An external id already linked, or claimed by an
        earlier call of the batch, is ``AlreadyExists`` (EXTERNAL_ID_TAKEN) for its call alone. Losing a
        race for an external id (another transaction linked it after this batch read) re-runs the batch,
        which then sees it taken.
        """
        # A call whose prefix has no number left fails alone: the batch is run again without it (a rare
        # path, at most once per such call).
        used_up: dict[int, Exception] = {}
        while True:
            try:
                return rerun_on_conflict(lambda: self._issue(items, used_up))
            except _UsedUp as refused:
                used_up[refused.slot] = refused.error

    def _issue(self, items: Sequence[Issuance], used_up: dict[int, Exception]) -> list[Issued | Exception]:
        with self._db.statements_unit() as connection:
            decided = _decide(connection, items, used_up)
            decided = self._claim(connection, items, decided)
            made = [slot for slot, outcome in enumerate(decided) if isinstance(outcome, Made)]
            try:
                allocated = allocate_numbers(
                    connection, [(items[s].new.prefix, items[s].make_number) for s in made]
                )
            except SerialSpaceUsedUp as none_left:
                raise _UsedUp(made[none_left.slot], none_left.error) from None
            stored: dict[str, StoredCustomer] = {}
            numbers: list[dict[str, Any]] = []
            externals: list[dict[str, Any]] = []
            events: list[NewEvent] = []
            for slot, number in zip(made, allocated, strict=True):
                item, new = items[slot], items[slot].new
                columns = static_number_columns(
                    new.customer_id, new.issuer, new.prefix, number, item.actor, item.now, "issued"
                )
                numbers.append(columns)
                externals.extend(
                    {
                        "namespace": r.namespace,
                        "value": r.value,
                        "customer_id": new.customer_id,
                        "linked_at": item.now,
                    }
                    for r in new.external_ids
                )
                details = {"customer_id": new.customer_id, "issuer": new.issuer}
                events.append(NewEvent(item.actor, ISSUED, mask(number.number), details))
                stored[new.customer_id] = _made(new, columns, item.now)
            with connection.together():
                if numbers:
                    connection.execute(_ADD_NUMBERS, numbers)
                if externals:
                    connection.execute(_ADD_EXTERNALS, externals)
            append_events(connection, events, max(item.now for item in items))
            # Replays answer with the customer as it is now, as a look-up would.
            replayed = {
                o.customer_id for o in decided if isinstance(o, Replay) and o.customer_id not in stored
            }
            stored.update(customers_in(connection, replayed))
        return [
            outcome
            if isinstance(outcome, Exception)
            else Issued(stored[outcome.customer_id], replayed=isinstance(outcome, Replay))
            for outcome in decided
        ]

    def _claim(
        self, connection: DriverConnection, items: Sequence[Issuance], decided: list[Outcome]
    ) -> list[Outcome]:
        """Insert the customers the batch makes; a call whose request_id another transaction took meanwhile
        replays that transaction's customer instead (or conflicts with it), and so do its in-batch retries.

        The rows go in (caller, request_id) order, so that concurrent batches on PostgreSQL that wait for
        each other's request_ids wait in one order.
        """
        made = [
            _customer_row(items[slot]) for slot, outcome in enumerate(decided) if isinstance(outcome, Made)
        ]
        rows = sorted(made, key=lambda row: (row["created_by"], row["request_id"]))
        if not rows:
            return decided
        if connection.execute(self._add_customers, rows).rowcount == len(rows):
            return decided
        # Customer ids are new, so those found are the ones this batch inserted.
        made_ids = [row["customer_id"] for row in rows]
        inserted = {row.customer_id for row in connection.execute(_MADE, {"customer_ids": made_ids})}
        # Lost to a transaction that committed the same (caller, request_id) after this batch read.
        lost = [row for row in rows if row["customer_id"] not in inserted]
        found = connection.execute(_EARLIER, {"request_ids": sorted({row["request_id"] for row in lost})})
        winners = {(w.created_by, w.request_id): (w.customer_id, w.request_fingerprint) for w in found}
        instead: dict[str, Outcome] = {}
        for row in lost:
            winner, fingerprint = winners[row["created_by"], row["request_id"]]
            conflict = fingerprint != row["request_fingerprint"]
            instead[row["customer_id"]] = idempotency_conflict() if conflict else Replay(winner)
        return [
            _instead(outcome, instead[outcome.customer_id])
            if not isinstance(outcome, Exception) and outcome.customer_id in instead
            else outcome
            for outcome in decided
        ]


@dataclass(frozen=True, slots=True)
class Made:
    """A call that makes its own new customer."""

    customer_id: str


@dataclass(frozen=True, slots=True)
class Replay:
    """A call that replays the customer an earlier call with its request_id made."""

    customer_id: str


Outcome = Made | Replay | Exception


def _customer_row(item: Issuance) -> dict[str, Any]:
    return {
        "customer_id": item.new.customer_id,
        "issuer": item.new.issuer,
        "created_at": item.now,
        "updated_at": item.now,
        "created_by": item.actor,
        "holder_ciphertext": item.new.holder_ciphertext,
        "holder_key_version": item.new.holder_key_version,
        "request_id": item.request_id,
        "request_fingerprint": item.fingerprint,
    }


def _instead(outcome: Made | Replay, replacement: Outcome) -> Outcome:
    """What a call that made, or replayed, a customer lost to another transaction gets instead."""
    if isinstance(replacement, Exception):
        # A retry in the batch has the lost call's fingerprint, so it conflicts with the winner alike.
        return idempotency_conflict()
    return replacement


class _UsedUp(Exception):
    """The call at ``slot`` of the batch wants a number of a prefix that has none left."""

    def __init__(self, slot: int, error: Exception) -> None:
        super().__init__(str(error))
        self.slot = slot
        self.error = error


def _decide(
    connection: DriverConnection, items: Sequence[Issuance], used_up: dict[int, Exception]
) -> list[Outcome]:
    """Each call's new customer, the customer it replays, or its error, judged in order.

    A call in ``used_up`` gets its error and makes nothing, so a retry of it later in the batch is judged
    afresh rather than replaying a customer never made.
    """
    # External ids first, request_ids after: each statement reads what was committed when it began (READ
    # COMMITTED), so a concurrent call that made the customer and linked its external id between the two
    # reads is seen by the second as a request_id to replay. Read the other way round, its external id would
    # be seen taken while its request_id was not yet, and a retry refused as EXTERNAL_ID_TAKEN.
    # Sent together (one round trip on PostgreSQL); the database still runs them in this order.
    with connection.together():
        named = externals_later(connection, {ref for item in items for ref in item.new.external_ids})
        rows = connection.execute(_EARLIER, {"request_ids": sorted({item.request_id for item in items})})
    taken = named.get()
    # A request_id is its caller's own (see store.idempotency): keyed by (caller, request_id).
    earlier = {(row.created_by, row.request_id): (row.customer_id, row.request_fingerprint) for row in rows}
    decided: list[Outcome] = []
    for slot, item in enumerate(items):
        key = (item.actor, item.request_id)
        if slot in used_up:
            decided.append(used_up[slot])
            continue
        if key in earlier:
            customer_id, fingerprint = earlier[key]
            decided.append(Replay(customer_id) if fingerprint == item.fingerprint else idempotency_conflict())
            continue
        clash = next((ref for ref in item.new.external_ids if ref in taken), None)
        if clash is not None:
            decided.append(
                AlreadyExists(
                    "this external id is already linked to a customer",
                    reason="EXTERNAL_ID_TAKEN",
                    metadata={"namespace": clash.namespace},
                )
            )
            continue
        earlier[key] = (item.new.customer_id, item.fingerprint)
        taken.update(dict.fromkeys(item.new.external_ids, item.new.customer_id))
        decided.append(Made(item.new.customer_id))
    return decided


def _made(new: NewCustomer, number: dict[str, Any], now: datetime) -> StoredCustomer:
    """A customer just written, as a look-up would read it back."""
    primary = CustomerNumber(
        number=number["number"],
        kind=NumberKind.STATIC,
        status=NumberStatus.ACTIVE,
        issuer=new.issuer,
        key_version=number["key_version"],
        issued_at=now,
        status_changed_at=now,
        status_reason=number["status_reason"],
    )
    customer = Customer(
        customer_id=new.customer_id,
        primary=primary,
        created_at=now,
        updated_at=now,
        sub_numbers=(),
        external_ids=tuple(new.external_ids),
    )
    return StoredCustomer(customer, new.holder_ciphertext, new.holder_key_version)
