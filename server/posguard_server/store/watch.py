"""Storage of the number watch: each number's counters as last seen and its usual use, and the watch's clock.

One pass (``watch``) runs in one database transaction: it locks the watch's state row (so replicas and
worker processes take turns, and a pass that another one just made is skipped), counts each number's use
since the last pass, lets the detector judge, moves the numbers' usual counts on, and opens a case for each
flagged number (one unresolved case per number at most).

Where the counts come from: verifications and failed verifications are the numbers' own counters (the
difference since the number was last seen); transactions and distinct merchants are the transactions scored
since the last pass; refused dynamic codes are the refused redemption attempts since then. The last three
belong to a customer and are counted for the customer's primary number.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import BigInteger, CheckConstraint, Double, Integer, String, distinct, func, select
from sqlalchemy.orm import Mapped, mapped_column

from posguard_server.domain.cases import Case
from posguard_server.domain.dynamic_codes import Reason as CodeReason
from posguard_server.domain.risk import StoredReason, TransactionSource
from posguard_server.domain.watch import SIGNALS
from posguard_server.store.cases import WatchFinding, open_watch_cases_in
from posguard_server.store.customers import CUSTOMER_ID_MAX, NUMBER_MAX, SqlCustomerNumber, primaries_in
from posguard_server.store.dynamic_codes import SqlDynamicCodeAttempt
from posguard_server.store.risk_tables import SqlRiskTransaction
from posguard_server.store.schema import Base

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from posguard_server.store.db import Database

_STATE_ID = 1
ACTOR = "watch"  # who opens a watch case, in the audit log

Counts = Mapping[str, float]
# (window counts by number, usual counts by number, window length) → flagged numbers with their reasons
Judge = Callable[[Mapping[str, Counts], Mapping[str, Counts], timedelta], dict[str, tuple[StoredReason, ...]]]
NextUsual = Callable[[Counts | None, Counts], dict[str, float]]


class SqlNumberWatch(Base):
    """A number the watch has seen in use: its counters then, and its usual counts per window."""

    __tablename__ = "number_watch"

    number: Mapped[str] = mapped_column(String(NUMBER_MAX), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(CUSTOMER_ID_MAX))
    verifications: Mapped[int] = mapped_column(BigInteger)
    failed_verifications: Mapped[int] = mapped_column(BigInteger)
    usual_verifications: Mapped[float] = mapped_column(Double)
    usual_failed_verifications: Mapped[float] = mapped_column(Double)
    usual_transactions: Mapped[float] = mapped_column(Double)
    usual_refused_codes: Mapped[float] = mapped_column(Double)
    usual_merchants: Mapped[float] = mapped_column(Double)
    windows: Mapped[int] = mapped_column(Integer)
    seen_at: Mapped[datetime]


class SqlNumberWatchState(Base):
    """The one row of the watch's clock: when it started, when it last looked, how far it read."""

    __tablename__ = "number_watch_state"
    __table_args__ = (CheckConstraint(f"id = {_STATE_ID}", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    started_at: Mapped[datetime]
    last_run_at: Mapped[datetime]
    # The highest risk_transactions.id counted so far: the next pass counts the rows after it.
    last_transaction_row: Mapped[int] = mapped_column(BigInteger)


_T = SqlRiskTransaction
_N = SqlCustomerNumber
_A = SqlDynamicCodeAttempt


class SqlNumberWatchStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    def watch(self, *, now: datetime, interval: timedelta, judge: Judge, next_usual: NextUsual) -> list[Case]:
        """One pass; the cases it opened. Less than half an interval after the last pass, it does nothing."""
        with self._db.session() as session:
            state = session.get(SqlNumberWatchState, _STATE_ID, with_for_update=True)
            last_row = session.scalar(select(func.max(_T.id))) or 0
            if state is None:
                # The first pass only takes its bearings: counters before it say nothing about a window.
                session.add(
                    SqlNumberWatchState(
                        id=_STATE_ID, started_at=now, last_run_at=now, last_transaction_row=last_row
                    )
                )
                return []
            if state.last_run_at > now - interval / 2:
                return []
            since = state.last_run_at
            window, seen, owners = _window(session, state, since, now)
            usual = {
                number: {signal: getattr(row, f"usual_{signal}") for signal in SIGNALS}
                for number, row in seen.items()
            }
            flagged = judge(window, usual, now - since)
            for number, counts in window.items():
                row = seen[number]
                moved = next_usual(usual.get(number) if row.windows else None, counts)
                for signal in SIGNALS:
                    setattr(row, f"usual_{signal}", moved[signal])
                row.windows += 1
                row.seen_at = now
            state.last_run_at = now
            state.last_transaction_row = max(state.last_transaction_row, last_row)
            session.flush()
            findings = [
                WatchFinding(number, owners[number], reasons) for number, reasons in sorted(flagged.items())
            ]
            return open_watch_cases_in(session, findings, actor=ACTOR, now=now)


def _window(
    session: Session, state: SqlNumberWatchState, since: datetime, now: datetime
) -> tuple[dict[str, dict[str, float]], dict[str, SqlNumberWatch], dict[str, str]]:
    """Each number's counts since the last pass, the watch rows of those numbers (new ones added), and each
    number's customer."""
    window: dict[str, dict[str, float]] = {}
    owners: dict[str, str] = {}
    verified = list(
        session.execute(
            select(_N.number, _N.customer_id, _N.verifications, _N.failed_verifications, _N.issued_at).where(
                _N.last_verified_at >= since
            )
        )
    )
    known = (
        {
            row.number: row
            for row in session.scalars(
                select(SqlNumberWatch).where(SqlNumberWatch.number.in_([v.number for v in verified]))
            )
        }
        if verified
        else {}
    )
    for number, customer_id, verifications, failed, issued_at in verified:
        row = known.get(number)
        owners[number] = customer_id
        if row is None:
            row = SqlNumberWatch(
                number=number,
                customer_id=customer_id,
                verifications=0,
                failed_verifications=0,
                windows=0,
                seen_at=now,
                **{f"usual_{signal}": 0.0 for signal in SIGNALS},
            )
            session.add(row)
            known[number] = row
            if issued_at < state.started_at:
                # Counted before the watch started: how much of it falls in this window is not known.
                row.verifications, row.failed_verifications = verifications, failed
                continue
        counts = window.setdefault(number, {})
        counts["verifications"] = float(verifications - row.verifications)
        counts["failed_verifications"] = float(failed - row.failed_verifications)
        row.verifications, row.failed_verifications = verifications, failed
    # What belongs to a customer counts for the customer's primary number.
    by_customer: dict[str, dict[str, float]] = {}
    for customer_id, transactions, merchants in session.execute(
        select(_T.customer_id, func.count(), func.count(distinct(_T.merchant_id)))
        .where(_T.id > state.last_transaction_row, _T.source == TransactionSource.SCORE.value)
        .group_by(_T.customer_id)
    ):
        by_customer.setdefault(customer_id, {}).update(
            transactions=float(transactions), merchants=float(merchants)
        )
    for refusing, refused in session.execute(
        select(_A.customer_id, func.count())
        .where(
            _A.attempted_at >= since,
            _A.attempted_at < now,
            _A.reason != CodeReason.OK.value,
            _A.customer_id.is_not(None),
        )
        .group_by(_A.customer_id)
    ):
        if refusing is not None:
            by_customer.setdefault(refusing, {})["refused_codes"] = float(refused)
    if by_customer:
        primaries = primaries_in(session.connection(), by_customer)
        for customer_id, counts in by_customer.items():
            primary = primaries.get(customer_id)
            if primary is None:
                continue
            window.setdefault(primary.number, {}).update(counts)
            owners[primary.number] = customer_id
            if primary.number not in known:
                row = session.get(SqlNumberWatch, primary.number)
                if row is None:
                    # Its verification counters are taken as they are now: they start being counted here.
                    current = session.execute(
                        select(_N.verifications, _N.failed_verifications).where(_N.number == primary.number)
                    ).one()
                    row = SqlNumberWatch(
                        number=primary.number,
                        customer_id=customer_id,
                        verifications=current.verifications,
                        failed_verifications=current.failed_verifications,
                        windows=0,
                        seen_at=now,
                        **{f"usual_{signal}": 0.0 for signal in SIGNALS},
                    )
                    session.add(row)
                known[primary.number] = row
    return window, known, owners
