"""Storage of the hash-chained audit log.

Events live in ``audit_events``, numbered 1, 2, 3... without gaps. ``audit_head`` holds one row with the
sequence and hash of the last event: every append locks it, so appends are serialised across threads,
processes and replicas, and each new event links to exactly the event before it. The head also anchors the
end of the chain, so cutting events off the tail is detected like any other deletion.

Other stores record their changes with :func:`append_event` inside their own session: the event commits or
rolls back together with the change it describes.
"""

from __future__ import annotations

import builtins
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, cast

from sqlalchemy import BigInteger, CheckConstraint, Integer, String, Text, bindparam, insert, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from posguard_server.domain.audit import (
    ACTION_MAX,
    ACTOR_MAX,
    GENESIS_HASH,
    SUBJECT_MAX,
    AuditEvent,
    AuditProblem,
    ChainHead,
    ChainReport,
    canonical_details,
    make_event,
    verify_chain,
)
from posguard_server.domain.errors import FailedPrecondition
from posguard_server.store.schema import Base

if TYPE_CHECKING:
    from sqlalchemy import Row, Select, Table

    from posguard_server.store.db import Database
    from posguard_server.store.driver import Runs

HASH_LENGTH = 64

# Detail keys are names ("reason", "customer_id"), never data: that keeps free text out of the keys and
# leaves room for the marker below, which no real key can equal.
_DETAIL_KEY = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_UNREADABLE = "(unreadable)"
_HEAD_ID = 1
# Rows fetched per query while verifying: bounded memory for a log of any length.
_VERIFY_BATCH = 1000


class SqlAuditEvent(Base):
    """One audit event. Rows are only ever inserted; nothing in posguard updates or deletes them."""

    __tablename__ = "audit_events"

    # Assigned as head + 1 under the head lock, never by the database: a sequence or identity column would
    # leave gaps on rollback, and a gap is exactly what verification reports as a deletion.
    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    occurred_at: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(ACTOR_MAX), index=True)
    action: Mapped[str] = mapped_column(String(ACTION_MAX), index=True)
    subject: Mapped[str] = mapped_column(String(SUBJECT_MAX), index=True)
    # Canonical JSON (sorted keys, no spaces), as hashed; see posguard_server.domain.audit.
    details: Mapped[str] = mapped_column(Text)
    previous_hash: Mapped[str] = mapped_column(String(HASH_LENGTH))
    hash: Mapped[str] = mapped_column(String(HASH_LENGTH))

    def __repr__(self) -> str:
        return f"SqlAuditEvent(sequence={self.sequence!r}, action={self.action!r})"


_INSERT_EVENT = insert(cast("Table", SqlAuditEvent.__table__))


class SqlAuditHead(Base):
    """The one row saying where the log ends; locked by every append."""

    __tablename__ = "audit_head"
    __table_args__ = (CheckConstraint(f"id = {_HEAD_ID}", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    sequence: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(HASH_LENGTH))


_HEAD = cast("Table", SqlAuditHead.__table__)
# Core statements built once: an append reads and moves the head without the ORM's unit of work.
_LOCK_HEAD = select(_HEAD.c.sequence, _HEAD.c.hash).where(_HEAD.c.id == _HEAD_ID).with_for_update()
_MOVE_HEAD = (
    update(_HEAD)
    .where(_HEAD.c.id == _HEAD_ID)
    .values(sequence=bindparam("b_sequence"), hash=bindparam("b_hash"))
)


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append: who did what to which subject; ``details`` as for ``append_event``."""

    actor: str
    action: str
    subject: str
    details: Mapping[str, str]


def append_event(
    session: Session,
    *,
    actor: str,
    action: str,
    subject: str,
    details: Mapping[str, str],
    now: datetime,
) -> AuditEvent:
    """Append an event in the caller's transaction and return it; it commits or rolls back with the caller.

    ``details`` must not hold holder names, phone numbers, secrets or full customer numbers: pass masked
    numbers. Call this after the change it records, as the last write of the transaction: on PostgreSQL the
    head row stays locked until the caller commits, and every other audited write waits for it. (On SQLite
    the writer's ``BEGIN IMMEDIATE`` already serialises all writers.)
    """
    return append_events(session, [NewEvent(actor, action, subject, details)], now)[0]


def append_events(on: Session | Runs, events: Sequence[NewEvent], now: datetime) -> list[AuditEvent]:
    """Append ``events`` in order, as ``append_event`` does one: a batch of calls takes the head lock once.

    ``on``: the unit's session, or the connection of a unit that runs Core statements only.
    """
    for new in events:
        _check_width("actor", new.actor, ACTOR_MAX, required=True)
        _check_width("action", new.action, ACTION_MAX, required=True)
        _check_width("subject", new.subject, SUBJECT_MAX, required=False)
        for key in new.details:
            if not isinstance(key, str) or not _DETAIL_KEY.fullmatch(key):
                raise ValueError("audit detail keys are lower-case names such as 'reason'")
    if not events:
        return []
    if isinstance(on, Session):
        # Write the caller's pending changes before taking the head lock, so the lock is the last one taken
        # and is held for as short a time as possible.
        on.flush()
    connection = on.connection() if isinstance(on, Session) else on
    head = connection.execute(_LOCK_HEAD).one_or_none()
    if head is None:
        # Refusing the change is better than recording it in a log whose end can no longer be checked.
        raise FailedPrecondition(
            "the audit log is damaged and cannot record changes", reason="AUDIT_LOG_DAMAGED"
        )
    occurred_at = _utc(now)
    made: list[AuditEvent] = []
    sequence, previous = head.sequence, head.hash
    for new in events:
        event = make_event(
            sequence=sequence + 1,
            occurred_at=occurred_at,
            actor=new.actor,
            action=new.action,
            subject=new.subject,
            details=new.details,
            previous_hash=previous,
        )
        made.append(event)
        sequence, previous = event.sequence, event.hash
    connection.execute(
        _INSERT_EVENT,
        [
            {
                "sequence": event.sequence,
                "occurred_at": event.occurred_at,
                "actor": event.actor,
                "action": event.action,
                "subject": event.subject,
                "details": canonical_details(event.details),
                "previous_hash": event.previous_hash,
                "hash": event.hash,
            }
            for event in made
        ],
    )
    connection.execute(_MOVE_HEAD, {"b_sequence": sequence, "b_hash": previous})
    return made


class SqlAuditStore:
    """Appends to, lists and verifies the audit log."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def append(
        self, *, actor: str, action: str, subject: str, details: Mapping[str, str], now: datetime
    ) -> AuditEvent:
        """Append an event in a transaction of its own (for events that record no other change)."""
        with self._db.session() as session:
            return append_event(
                session, actor=actor, action=action, subject=subject, details=details, now=now
            )

    def list(
        self,
        *,
        action: str | None = None,
        actor: str | None = None,
        subject: str | None = None,
        occurred_after: datetime | None = None,
        occurred_before: datetime | None = None,
        limit: int,
        after: int | None = None,
    ) -> tuple[builtins.list[AuditEvent], int | None]:
        """One page of events in sequence order and the cursor for the next page (None after the last).

        Filters are exact matches; ``occurred_after`` is inclusive and ``occurred_before`` exclusive. The
        cursor is the last sequence of the page: pass it back as ``after``.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        query = _event_columns().order_by(SqlAuditEvent.sequence).limit(limit + 1)
        if action:
            query = query.where(SqlAuditEvent.action == action)
        if actor:
            query = query.where(SqlAuditEvent.actor == actor)
        if subject:
            query = query.where(SqlAuditEvent.subject == subject)
        if occurred_after is not None:
            query = query.where(SqlAuditEvent.occurred_at >= _utc(occurred_after))
        if occurred_before is not None:
            query = query.where(SqlAuditEvent.occurred_at < _utc(occurred_before))
        if after is not None:
            query = query.where(SqlAuditEvent.sequence > after)
        with self._db.session(read_only=True) as session:
            # One row beyond the page tells whether another page exists without a second query.
            rows = session.execute(query).all()
        page = [_to_domain(row) for row in rows[:limit]]
        cursor = page[-1].sequence if len(rows) > limit else None
        return page, cursor

    def head(self) -> ChainHead:
        """Where the log ends (sequence 0 and the genesis hash while it is empty)."""
        with self._db.session(read_only=True) as session:
            return _read_head(session) or ChainHead(0, GENESIS_HASH)

    def verify(self, from_sequence: int = 0) -> ChainReport:
        """Recompute the chain from ``from_sequence`` (0 or 1: from the start) to the head.

        A later start links to the stored hash of the event before it, so a long log can be checked in
        parts. Rows are streamed in batches, so memory stays bounded however long the log is.
        """
        if from_sequence < 0:
            raise ValueError("from_sequence must not be negative")
        start = max(from_sequence, 1)
        with self._db.session(read_only=True) as session:
            if self._db.dialect == "postgresql":
                # One snapshot for the head and every batch: events appended while we read must not look
                # like events past the head. (SQLite's read transaction is a snapshot already.)
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            head = _read_head(session)
            if head is None:
                # No event to name: the record of where the log ends was removed.
                return ChainReport(
                    intact=False,
                    entries_checked=0,
                    first_bad_sequence=0,
                    problem=AuditProblem.DELETED,
                    detail="the record of where the log ends is missing, so its end cannot be checked",
                )
            start_hash = GENESIS_HASH
            if start > 1:
                before = session.scalar(select(SqlAuditEvent.hash).where(SqlAuditEvent.sequence == start - 1))
                if before is None and start - 1 <= head.sequence:
                    return ChainReport(
                        intact=False,
                        entries_checked=0,
                        first_bad_sequence=start - 1,
                        problem=AuditProblem.DELETED,
                        detail=f"event {start - 1}, which event {start} links to, is missing",
                    )
                # Past the head there is nothing to link to; any event found there is reported as inserted.
                start_hash = before or head.hash
            return verify_chain(
                _stream(session, start),
                start_previous_hash=start_hash,
                start_sequence=start,
                head=head,
            )


def _stream(session: Session, start: int) -> Iterator[AuditEvent]:
    """Events from ``start`` on, in sequence order, fetched in keyset batches."""
    after = start - 1
    while True:
        rows = session.execute(
            _event_columns()
            .where(SqlAuditEvent.sequence > after)
            .order_by(SqlAuditEvent.sequence)
            .limit(_VERIFY_BATCH)
        ).all()
        for row in rows:
            yield _to_domain(row)
        if len(rows) < _VERIFY_BATCH:
            return
        after = rows[-1].sequence


def _event_columns() -> Select[int, datetime, str, str, str, str, str, str]:
    # Plain rows rather than ORM objects: a long verification would otherwise fill the identity map.
    return select(
        SqlAuditEvent.sequence,
        SqlAuditEvent.occurred_at,
        SqlAuditEvent.actor,
        SqlAuditEvent.action,
        SqlAuditEvent.subject,
        SqlAuditEvent.details,
        SqlAuditEvent.previous_hash,
        SqlAuditEvent.hash,
    )


def _read_head(session: Session) -> ChainHead | None:
    row = session.execute(
        select(SqlAuditHead.sequence, SqlAuditHead.hash).where(SqlAuditHead.id == _HEAD_ID)
    ).one_or_none()
    return None if row is None else ChainHead(row.sequence, row.hash)


def _to_domain(row: Row[int, datetime, str, str, str, str, str, str]) -> AuditEvent:
    return AuditEvent(
        sequence=row.sequence,
        occurred_at=row.occurred_at,
        actor=row.actor,
        action=row.action,
        subject=row.subject,
        details=_decode_details(row.details),
        previous_hash=row.previous_hash,
        hash=row.hash,
    )


def _decode_details(text: str) -> dict[str, str]:
    """The stored details; text that is not what ``append_event`` writes is shown raw under a marker key.

    Such text can only come from tampering. The marker key cannot occur in a real event, so the event then
    fails its hash and verification reports it as edited, instead of the listing or the check crashing.
    """
    try:
        decoded = json.loads(text)
    except ValueError:
        return {_UNREADABLE: text}
    if not isinstance(decoded, dict) or not all(isinstance(v, str) for v in decoded.values()):
        return {_UNREADABLE: text}
    return cast("dict[str, str]", decoded)


def _check_width(name: str, value: str, maximum: int, *, required: bool) -> None:
    # Callers pass key ids, action names and masked numbers; an over-long one is a bug in the caller, and
    # PostgreSQL would reject it while SQLite silently kept it.
    if len(value) > maximum or (required and not value):
        raise ValueError(
            f"audit {name} must be at most {maximum} characters" + (" and not empty" if required else "")
        )


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("timestamps must be timezone-aware")
    return moment.astimezone(UTC)
