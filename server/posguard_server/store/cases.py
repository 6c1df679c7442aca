"""Storage of review cases: the queue, assignment, and resolution with its outcome or rotation.

Cases of transactions are opened by scoring, in the scoring batch's own transaction (``case_row`` and
``insert_cases``, Core statements in the batch's executemany style); the unique transaction id keeps it to one
case per transaction, and a replayed score stores nothing, so it opens none. Number watch cases are opened by
the watch (``open_watch_cases``); a partial unique index keeps one unresolved case per number.

Resolving runs the outcome report's own code (``outcomes.report_outcome_in``) or the lifecycle's
(``customers.apply_transition``) in the case's transaction: the case, its label or rotation, its idempotency
key and its audit events commit together.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import (
    CheckConstraint,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    insert,
    select,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from posguard_server.domain.cases import (
    ASSIGNEE_MAX,
    CASE_ID_LENGTH,
    OUTCOMES,
    RESOLUTIONS,
    Case,
    CaseFilter,
    CaseKind,
    CaseStatus,
    Resolution,
    new_case_id,
)
from posguard_server.domain.customers import Transition, mask
from posguard_server.domain.errors import FailedPrecondition, InvalidArgument, NotFound
from posguard_server.domain.risk import Channel, Decision, Outcome, StoredReason
from posguard_server.store.audit import NewEvent, append_events
from posguard_server.store.customers import (
    CUSTOMER_ID_MAX,
    NUMBER_MAX,
    REASON_MAX,
    TRANSITION_ACTIONS,
    MakeNumber,
    apply_transition,
    lock_number,
)
from posguard_server.store.idempotency import earlier_call, record_call
from posguard_server.store.outcomes import report_outcome_in
from posguard_server.store.risk_tables import (
    OUTCOME_NOTE_MAX,
    TRANSACTION_ID_MAX,
    SqlRiskTransaction,
    reasons_from_json,
    reasons_json,
)
from posguard_server.store.schema import PRINCIPAL_MAX, Base, utc

if TYPE_CHECKING:
    from sqlalchemy import Table
    from sqlalchemy.orm import Session

    from posguard_server.store.db import Database
    from posguard_server.store.driver import Runs

ASSIGNED = "case.assigned"
RESOLVED = "case.resolved"
OPENED = "case.opened"
# The outcome a resolution records is kept under this request id (a case resolves once), apart from any
# ReportOutcome request id its caller uses.
OUTCOME_REQUEST_PREFIX = "case:"
RECENT_TRANSACTIONS = 20
_UNRESOLVED = text("status != 'resolved'")


def _in_list(column: str, values: Collection[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in sorted(values))})"


class SqlCase(Base):
    """One review case. Transaction cases name their transaction; number watch cases their number."""

    __tablename__ = "cases"
    __table_args__ = (
        CheckConstraint(_in_list("kind", [k.value for k in CaseKind]), name="kind"),
        CheckConstraint(_in_list("status", [s.value for s in CaseStatus]), name="status"),
        CheckConstraint(_in_list("resolution", [r.value for r in Resolution]), name="resolution"),
        # The queue: cases of a status, oldest first.
        Index("ix_cases_status_id", "status", "id"),
        # One unresolved number watch case per number; transaction cases have no number (NULLs never collide).
        Index(
            "uq_cases_open_number",
            "number",
            unique=True,
            sqlite_where=_UNRESOLVED,
            postgresql_where=_UNRESOLVED,
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    case_id: Mapped[str] = mapped_column(String(CASE_ID_LENGTH), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    customer_id: Mapped[str] = mapped_column(
        String(CUSTOMER_ID_MAX), ForeignKey("customers.customer_id"), index=True
    )
    # Unique: one case per transaction, also when two replicas score the same transaction at once.
    transaction_id: Mapped[str | None] = mapped_column(
        String(TRANSACTION_ID_MAX), ForeignKey("risk_transactions.transaction_id"), unique=True
    )
    number: Mapped[str | None] = mapped_column(String(NUMBER_MAX))
    decision: Mapped[str | None] = mapped_column(String(16))
    risk_score: Mapped[float | None] = mapped_column(Double)
    # JSON list of {"code", "message", "weight"}, as a transaction's reasons are stored.
    reasons: Mapped[str] = mapped_column(Text)
    # The reason codes between commas (",AMOUNT_HIGH,NEW_TERMINAL,"): ListCases filters on one with LIKE.
    reason_codes: Mapped[str] = mapped_column(Text)
    opened_at: Mapped[datetime] = mapped_column(index=True)
    assignee: Mapped[str | None] = mapped_column(String(ASSIGNEE_MAX), index=True)
    assigned_at: Mapped[datetime | None]
    resolution: Mapped[str | None] = mapped_column(String(16))
    note: Mapped[str | None] = mapped_column(String(OUTCOME_NOTE_MAX))
    resolved_at: Mapped[datetime | None]
    resolved_by: Mapped[str | None] = mapped_column(String(PRINCIPAL_MAX))


_CASES = cast("Table", SqlCase.__table__)
_INSERT_CASES = insert(_CASES)


def _codes(reasons: Sequence[StoredReason]) -> str:
    return "," + "".join(f"{reason.code}," for reason in reasons)


def case_row(
    *,
    transaction_id: str,
    customer_id: str,
    decision: Decision,
    risk_score: float,
    reasons: Sequence[StoredReason],
    reasons_stored: str,
    opened_at: datetime,
) -> dict[str, Any]:
    """The row of a transaction's case, for ``insert_cases``; every row has the same keys (executemany)."""
    return {
        "case_id": new_case_id(),
        "kind": CaseKind.TRANSACTION.value,
        "status": CaseStatus.OPEN.value,
        "customer_id": customer_id,
        "transaction_id": transaction_id,
        "number": None,
        "decision": decision.value,
        "risk_score": risk_score,
        "reasons": reasons_stored,
        "reason_codes": _codes(reasons),
        "opened_at": opened_at,
    }


def insert_cases(connection: Runs, rows: list[dict[str, Any]]) -> None:
    """Store transactions' cases in one executemany, in the transaction that stores the transactions."""
    if rows:
        connection.execute(_INSERT_CASES, rows)


@dataclass(frozen=True, slots=True)
class CaseTransactionView:
    """A transaction as a case shows it."""

    transaction_id: str
    event_time: datetime
    amount_minor: int
    currency: str
    merchant_id: str
    terminal_id: str
    mcc: str
    channel: Channel
    decision: Decision | None
    risk_score: float
    reasons: tuple[StoredReason, ...]
    outcome: Outcome | None


@dataclass(frozen=True, slots=True)
class CaseDetail:
    """A case with its transaction (transaction cases) and the customer's latest other transactions."""

    case: Case
    transaction: CaseTransactionView | None
    recent: list[CaseTransactionView]


@dataclass(frozen=True, slots=True)
class WatchFinding:
    """A number the watch found used abnormally, and why (codes starting with WATCH_)."""

    number: str
    customer_id: str
    reasons: tuple[StoredReason, ...]


# (number) → the MakeNumber that issues its successor under its scheme.
MakeNumberFor = Callable[[str], MakeNumber]


class SqlCaseStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    def list_cases(
        self, where: CaseFilter, *, limit: int, after: int | None
    ) -> tuple[list[Case], int | None]:
        """One page of cases, oldest first; the cursor of the next page or None on the last."""
        query = select(SqlCase).order_by(SqlCase.id).limit(limit + 1)
        if after is not None:
            query = query.where(SqlCase.id > after)
        if where.status is not None:
            query = query.where(SqlCase.status == where.status.value)
        if where.kind is not None:
            query = query.where(SqlCase.kind == where.kind.value)
        if where.assignee:
            query = query.where(SqlCase.assignee == where.assignee)
        if where.reason:
            # Codes are upper snake case (validated): no LIKE wildcard can be in one.
            query = query.where(SqlCase.reason_codes.like(f"%,{where.reason},%"))
        if where.opened_after is not None:
            query = query.where(SqlCase.opened_at >= where.opened_after)
        if where.opened_before is not None:
            query = query.where(SqlCase.opened_at < where.opened_before)
        with self._db.session(read_only=True) as session:
            rows = list(session.scalars(query))
        more = len(rows) > limit
        rows = rows[:limit]
        return [_case(row) for row in rows], (rows[-1].id if more and rows else None)

    def get(self, case_id: str) -> CaseDetail:
        with self._db.session(read_only=True) as session:
            row = _find(session, case_id)
            transaction = None
            if row.transaction_id is not None:
                found = session.scalar(
                    select(SqlRiskTransaction).where(SqlRiskTransaction.transaction_id == row.transaction_id)
                )
                transaction = _view(found) if found is not None else None
            recent = session.scalars(
                select(SqlRiskTransaction)
                .where(
                    SqlRiskTransaction.customer_id == row.customer_id,
                    SqlRiskTransaction.transaction_id != (row.transaction_id or ""),
                )
                .order_by(SqlRiskTransaction.event_time.desc(), SqlRiskTransaction.id.desc())
                .limit(RECENT_TRANSACTIONS)
            )
            return CaseDetail(_case(row), transaction, [_view(t) for t in recent])

    def customer_transactions(self, customer_id: str, *, limit: int) -> list[CaseTransactionView]:
        """A customer's latest scored transactions, newest first (the console's customer page)."""
        with self._db.session(read_only=True) as session:
            rows = session.scalars(
                select(SqlRiskTransaction)
                .where(SqlRiskTransaction.customer_id == customer_id)
                .order_by(SqlRiskTransaction.event_time.desc(), SqlRiskTransaction.id.desc())
                .limit(limit)
            )
            return [_view(row) for row in rows]

    def assign(
        self, case_id: str, assignee: str, *, request_id: str, fingerprint: str, actor: str, now: datetime
    ) -> Case:
        """Assign an unresolved case; a retry of the same request changes nothing and returns the case."""
        with self._db.session() as session:
            row = _find(session, case_id, lock=True)
            if earlier_call(session, ASSIGNED, actor, request_id, fingerprint) is not None:
                return _case(row)
            if row.status == CaseStatus.RESOLVED.value:
                raise FailedPrecondition("the case is resolved", reason="CASE_RESOLVED")
            row.status = CaseStatus.ASSIGNED.value
            row.assignee = assignee
            row.assigned_at = now
            record_call(
                session, ASSIGNED, actor, request_id, fingerprint, customer_id=row.customer_id, now=now
            )
            session.flush()
            append_events(
                session,
                [NewEvent(actor, ASSIGNED, case_id, {"assignee": assignee, "customer_id": row.customer_id})],
                now,
            )
            return _case(row)

    def resolve(
        self,
        case_id: str,
        resolution: Resolution,
        note: str,
        *,
        request_id: str,
        fingerprint: str,
        actor: str,
        now: datetime,
        make_number_for: MakeNumberFor,
    ) -> tuple[Case, bool]:
        """Resolve a case once, with its outcome (transaction cases) or its rotation (ROTATE).

        Returns ``(case, replayed)``: a retry of the same request changes nothing and returns the case.
        """
        with self._db.session() as session:
            # Lock first, then look for an earlier run: a concurrent retry waits here and then replays.
            row = _find(session, case_id, lock=True)
            if earlier_call(session, RESOLVED, actor, request_id, fingerprint) is not None:
                return _case(row), True
            kind = CaseKind(row.kind)
            if resolution not in RESOLUTIONS[kind]:
                fits = " or ".join(sorted(r.name for r in RESOLUTIONS[kind]))
                raise InvalidArgument.field("resolution", f"must be {fits} for a {kind.value} case")
            if row.status == CaseStatus.RESOLVED.value:
                raise FailedPrecondition("the case is already resolved", reason="CASE_RESOLVED")
            details = {"customer_id": row.customer_id, "resolution": resolution.value, "note": note}
            events: list[NewEvent] = []
            if kind is CaseKind.TRANSACTION:
                assert row.transaction_id is not None
                details["transaction_id"] = row.transaction_id
                # Exactly what ReportOutcome records: the label reaches training, evaluation and the
                # evidence about the place it was paid at.
                report_outcome_in(
                    session,
                    row.transaction_id,
                    OUTCOMES[resolution],
                    reported_at=now,
                    note=note,
                    request_id=OUTCOME_REQUEST_PREFIX + case_id,
                    fingerprint=fingerprint,
                    caller=actor,
                    now=now,
                )
            elif resolution is Resolution.ROTATE:
                assert row.number is not None
                details["number"] = mask(row.number)
                reason = f"case {case_id}" + (f": {note}" if note else "")
                _, rotated = apply_transition(
                    session,
                    lock_number(session, row.number),
                    Transition.ROTATE,
                    reason=reason[:REASON_MAX],
                    actor=actor,
                    now=now,
                    make_number=make_number_for(row.number),
                )
                rotation = TRANSITION_ACTIONS[Transition.ROTATE]
                events.append(NewEvent(actor, rotation, mask(row.number), rotated))
            row.status = CaseStatus.RESOLVED.value
            row.resolution = resolution.value
            row.note = note
            row.resolved_at = now
            row.resolved_by = actor
            record_call(
                session, RESOLVED, actor, request_id, fingerprint, customer_id=row.customer_id, now=now
            )
            session.flush()
            events.append(NewEvent(actor, RESOLVED, case_id, details))
            append_events(session, events, now)
            return _case(row), False

    def open_watch_cases(self, findings: Sequence[WatchFinding], *, actor: str, now: datetime) -> list[Case]:
        """Open a number watch case for each finding whose number has no unresolved case yet (audited)."""
        with self._db.session() as session:
            return open_watch_cases_in(session, findings, actor=actor, now=now)


def open_watch_cases_in(
    session: Session, findings: Sequence[WatchFinding], *, actor: str, now: datetime
) -> list[Case]:
    """``SqlCaseStore.open_watch_cases`` in the caller's transaction; the audit events are its last write."""
    if not findings:
        return []
    numbers = sorted({f.number for f in findings})
    taken = set(
        session.scalars(
            select(SqlCase.number).where(
                SqlCase.number.in_(numbers), SqlCase.status != CaseStatus.RESOLVED.value
            )
        )
    )
    rows = []
    for finding in findings:
        if finding.number in taken:
            continue
        taken.add(finding.number)
        rows.append(
            SqlCase(
                case_id=new_case_id(),
                kind=CaseKind.NUMBER_WATCH.value,
                status=CaseStatus.OPEN.value,
                customer_id=finding.customer_id,
                number=finding.number,
                reasons=reasons_json(finding.reasons),
                reason_codes=_codes(finding.reasons),
                opened_at=now,
            )
        )
    session.add_all(rows)
    session.flush()
    append_events(
        session,
        [
            NewEvent(
                actor,
                OPENED,
                row.case_id,
                {
                    "customer_id": row.customer_id,
                    "number": mask(row.number or ""),
                    "reasons": row.reason_codes.strip(","),
                },
            )
            for row in rows
        ],
        now,
    )
    return [_case(row) for row in rows]


def _find(session: Session, case_id: str, *, lock: bool = False) -> SqlCase:
    query = select(SqlCase).where(SqlCase.case_id == case_id)
    row = session.scalar(query.with_for_update() if lock else query)
    if row is None:
        raise NotFound("no such case", reason="CASE_NOT_FOUND")
    return row


def _case(row: SqlCase) -> Case:
    return Case(
        case_id=row.case_id,
        kind=CaseKind(row.kind),
        status=CaseStatus(row.status),
        customer_id=row.customer_id,
        transaction_id=row.transaction_id or "",
        number=row.number or "",
        decision=Decision(row.decision) if row.decision else None,
        risk_score=row.risk_score or 0.0,
        reasons=reasons_from_json(row.reasons),
        opened_at=utc(row.opened_at),
        assignee=row.assignee or "",
        assigned_at=row.assigned_at,
        resolution=Resolution(row.resolution) if row.resolution else None,
        note=row.note or "",
        resolved_at=row.resolved_at,
        resolved_by=row.resolved_by or "",
    )


def _view(row: SqlRiskTransaction) -> CaseTransactionView:
    return CaseTransactionView(
        transaction_id=row.transaction_id,
        event_time=row.event_time,
        amount_minor=row.amount_minor,
        currency=row.currency,
        merchant_id=row.merchant_id,
        terminal_id=row.terminal_id,
        mcc=row.mcc,
        channel=Channel(row.channel),
        decision=Decision(row.decision) if row.decision else None,
        risk_score=row.risk_score or 0.0,
        reasons=reasons_from_json(row.reasons),
        outcome=Outcome(row.outcome) if row.outcome else None,
    )
