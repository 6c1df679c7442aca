"""Outcome labels of stored transactions: one report at a time (idempotent), in bulk, and read back."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, select, update

from posguard_server.domain.errors import AlreadyExists, NotFound
from posguard_server.domain.risk import LabelledTransaction, Outcome, OutcomeRecord
from posguard_server.store.risk_tables import (
    ATTEMPTS,
    CHUNK,
    FRAUD_LABELS,
    TRANSACTIONS,
    SqlRiskOutcomeReport,
    SqlRiskTransaction,
    chunks,
    request_conflict,
    summed_rowcount,
)
from posguard_server.store.schema import utc

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from posguard_server.store.db import Database


_T = SqlRiskTransaction


class SqlOutcomeStore:
    """Fraud, chargeback and legitimate labels on stored transactions."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def report_outcome(
        self,
        transaction_id: str,
        outcome: Outcome,
        *,
        reported_at: datetime,
        note: str,
        request_id: str,
        fingerprint: str,
        caller: str,
        now: datetime,
    ) -> tuple[OutcomeRecord, bool]:
        """Label a stored transaction; ``(record, replayed)``.

        A later report (another request_id) replaces the label: a chargeback can follow a legitimate. A
        retry with the same ``request_id`` and ``fingerprint`` from the same ``caller`` returns what that
        report set and changes nothing, even after a later report replaced its label.
        """
        for attempt in range(ATTEMPTS):
            try:
                return self._report_once(
                    transaction_id,
                    outcome,
                    reported_at=reported_at,
                    note=note,
                    request_id=request_id,
                    fingerprint=fingerprint,
                    caller=caller,
                    now=now,
                )
            except AlreadyExists:
                # The same request_id committed concurrently: the re-run replays it.
                if attempt == ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _report_once(
        self,
        transaction_id: str,
        outcome: Outcome,
        *,
        reported_at: datetime,
        note: str,
        request_id: str,
        fingerprint: str,
        caller: str,
        now: datetime,
    ) -> tuple[OutcomeRecord, bool]:
        with self._db.session() as session:
            return report_outcome_in(
                session,
                transaction_id,
                outcome,
                reported_at=reported_at,
                note=note,
                request_id=request_id,
                fingerprint=fingerprint,
                caller=caller,
                now=now,
            )

    def bulk_outcomes(self, items: Sequence[tuple[str, Outcome, datetime]]) -> int:
        """Label stored transactions ``(transaction_id, outcome, outcome_at)`` in one transaction.

        Unknown ids are skipped; returns how many distinct transactions were labelled. Later items win.
        """
        latest = {transaction_id: (outcome, at) for transaction_id, outcome, at in items}
        if not latest:
            return 0
        statement = (
            update(TRANSACTIONS)
            .where(TRANSACTIONS.c.transaction_id == bindparam("tid"))
            .values(outcome=bindparam("label"), outcome_at=bindparam("at"))
        )
        matched = 0
        with self._db.session() as session:
            connection = session.connection()
            for chunk in chunks(list(latest.items()), CHUNK):
                params = [{"tid": tid, "label": label.value, "at": utc(at)} for tid, (label, at) in chunk]
                # Both drivers sum the row counts of an executemany (the dialects declare it); unknown ids
                # count 0. Reading the ids first would risk the scan described in
                # SqlHistoryStore.import_transactions.
                matched += summed_rowcount(connection.execute(statement, params).rowcount)
        return matched

    def labelled(
        self, *, since: datetime | None = None, until: datetime | None = None
    ) -> list[LabelledTransaction]:
        """Transactions labelled FRAUD or CHARGEBACK with ``since <= outcome_at < until``, oldest first."""
        query = (
            select(
                _T.transaction_id,
                _T.customer_id,
                _T.merchant_id,
                _T.terminal_id,
                _T.event_time,
                _T.outcome,
                _T.outcome_at,
            )
            .where(_T.outcome.in_(FRAUD_LABELS))
            .order_by(_T.outcome_at, _T.id)
        )
        if since is not None:
            query = query.where(_T.outcome_at >= since)
        if until is not None:
            query = query.where(_T.outcome_at < until)
        with self._db.session(read_only=True) as session:
            return [
                LabelledTransaction(
                    transaction_id=row.transaction_id,
                    customer_id=row.customer_id,
                    merchant_id=row.merchant_id,
                    terminal_id=row.terminal_id,
                    event_time=row.event_time,
                    outcome=Outcome(row.outcome),
                    outcome_at=row.outcome_at,
                )
                for row in session.execute(query)
            ]


def report_outcome_in(
    session: Session,
    transaction_id: str,
    outcome: Outcome,
    *,
    reported_at: datetime,
    note: str,
    request_id: str,
    fingerprint: str,
    caller: str,
    now: datetime,
) -> tuple[OutcomeRecord, bool]:
    """Label a stored transaction in the caller's transaction: the one definition of an outcome report.

    ReportOutcome runs it in a transaction of its own; resolving a review case runs it in the case's, so the
    label and the case's resolution commit together. ``(record, replayed)`` as ``report_outcome`` says.
    """
    earlier = session.get(SqlRiskOutcomeReport, (request_id, caller))
    if earlier is not None:
        if earlier.fingerprint != fingerprint:
            raise request_conflict("was already used for a different request")
        customer_id = session.scalar(
            select(_T.customer_id).where(_T.transaction_id == earlier.transaction_id)
        )
        return (
            OutcomeRecord(
                transaction_id=earlier.transaction_id,
                customer_id=customer_id or "",
                outcome=Outcome(earlier.outcome),
                outcome_at=earlier.outcome_at,
                note=earlier.note,
            ),
            True,
        )
    outcome_at = utc(reported_at)
    customer_id = session.scalar(
        update(_T)
        .where(_T.transaction_id == transaction_id)
        .values(
            outcome=outcome.value,
            outcome_at=outcome_at,
            outcome_note=note,
            outcome_request_id=request_id,
        )
        .returning(_T.customer_id)
    )
    if customer_id is None:
        raise NotFound("no transaction has this id", reason="TRANSACTION_NOT_FOUND")
    session.add(
        SqlRiskOutcomeReport(
            request_id=request_id,
            caller=caller,
            fingerprint=fingerprint,
            transaction_id=transaction_id,
            outcome=outcome.value,
            outcome_at=outcome_at,
            note=note,
            received_at=utc(now),
        )
    )
    session.flush()
    return OutcomeRecord(transaction_id, customer_id, outcome, outcome_at, note), False
