"""Transaction history: imported in bulk, and streamed back in whole customers for training and evaluation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, or_, select

from posguard_server.domain.risk import Channel, HistoryBatch, NewTransaction, Outcome, TransactionSource
from posguard_server.store.risk_tables import (
    CHUNK,
    FRAUD_LABELS,
    TRANSACTIONS,
    SqlRiskTransaction,
    chunks,
    insert_for,
    require_customers,
    summed_rowcount,
    transaction_values,
)

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement

    from posguard_server.store.db import Database

_HISTORY_BATCH_ROWS = 50_000

_T = SqlRiskTransaction

# What a history batch carries, in this order; the id is only the keyset-pagination tie breaker.
_HISTORY_COLUMNS = (
    _T.id,
    _T.transaction_id,
    _T.customer_id,
    _T.event_time,
    _T.amount_minor,
    _T.currency,
    _T.merchant_id,
    _T.terminal_id,
    _T.mcc,
    _T.channel,
    _T.latitude,
    _T.longitude,
    _T.outcome,
    _T.outcome_at,
)


class SqlHistoryStore:
    """Imported transactions, and every transaction that counts in history, read back in pages."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def import_transactions(self, rows: Sequence[NewTransaction]) -> int:
        """Store history in one transaction, skipping transaction ids already stored; returns the new count.

        Idempotent, so an interrupted import can simply be run again. Every customer must exist.
        """
        unique: dict[str, NewTransaction] = {}
        for row in rows:
            # The first occurrence wins, as it would have if the rows had come in two imports.
            unique.setdefault(row.transaction_id, row)
        if not unique:
            return 0
        added = 0
        with self._db.session() as session:
            require_customers(session, {row.customer_id for row in unique.values()})
            # ON CONFLICT rather than a read of the ids first: a statement PostgreSQL prepared while the
            # table was small keeps its plan, a scan, for the rest of a long import.
            statement = (
                insert_for(session)(TRANSACTIONS)
                .on_conflict_do_nothing(index_elements=["transaction_id"])
                .execution_options(preserve_rowcount=True)
            )
            connection = session.connection()
            for chunk in chunks(list(unique.values()), CHUNK):
                values = [transaction_values(row, TransactionSource.IMPORT, in_history=True) for row in chunk]
                # A plain executemany (no RETURNING) is the fastest path on both drivers, and both sum its
                # row counts: skipped rows count 0.
                added += summed_rowcount(connection.execute(statement, values).rowcount)
        return added

    def history(
        self,
        *,
        customer_ids: Sequence[str] | None = None,
        until: datetime | None = None,
        exclude_labelled_fraud: bool = True,
        labels_known_at: datetime | None = None,
        batch_rows: int = _HISTORY_BATCH_ROWS,
    ) -> Iterator[HistoryBatch]:
        """Stream stored transactions ordered by (customer_id, event_time, id), whole customers per batch.

        Only transactions that count in history, with ``event_time`` strictly before ``until`` when given.
        With ``exclude_labelled_fraud``, transactions labelled FRAUD or CHARGEBACK are left out (only those
        labelled at or before ``labels_known_at`` when it is given). A batch holds about ``batch_rows`` rows,
        more when one customer alone has more. Each page is read in a short transaction of its own, so a slow
        consumer never holds the database open.
        """
        if batch_rows < 1:
            raise ValueError("batch_rows must be positive")
        conditions: list[ColumnElement[bool]] = [_T.in_history.is_(True)]
        if until is not None:
            conditions.append(_T.event_time < until)
        if exclude_labelled_fraud:
            labelled: ColumnElement[bool] = _T.outcome.in_(FRAUD_LABELS)
            if labels_known_at is not None:
                labelled = and_(labelled, _T.outcome_at <= labels_known_at)
            conditions.append(or_(_T.outcome.is_(None), ~labelled))
        if customer_ids is None:
            groups: Iterable[list[ColumnElement[bool]]] = [conditions]
        else:
            wanted = sorted(set(customer_ids))
            groups = ([*conditions, _T.customer_id.in_(chunk)] for chunk in chunks(wanted, CHUNK))
        pending: list[Any] = []
        for group in groups:
            for page in self._customer_pages(group, batch_rows):
                pending.extend(page)
                if len(pending) >= batch_rows:
                    yield _history_batch(pending)
                    pending = []
        if pending:
            yield _history_batch(pending)

    def _customer_pages(self, conditions: list[ColumnElement[bool]], page_rows: int) -> Iterator[list[Any]]:
        """Rows matching ``conditions`` in history order, in pages that each end with a whole customer."""
        ordered = select(*_HISTORY_COLUMNS).where(*conditions).order_by(_T.customer_id, _T.event_time, _T.id)
        after: str | None = None
        while True:
            query = ordered.limit(page_rows)
            if after is not None:
                query = query.where(_T.customer_id > after)
            with self._db.session(read_only=True) as session:
                rows: list[Any] = list(session.execute(query))
            if len(rows) < page_rows:
                if rows:
                    yield rows
                return
            last = rows[-1].customer_id
            cut = len(rows)
            while cut > 0 and rows[cut - 1].customer_id == last:
                cut -= 1
            if cut > 0:
                # The page may end inside a customer: leave that customer whole for the next page.
                yield rows[:cut]
                after = rows[cut - 1].customer_id
                continue
            # One customer fills the whole page: read the rest of that customer before moving on.
            yield rows + self._rest_of_customer(ordered, last, rows[-1], page_rows)
            after = last

    def _rest_of_customer(self, ordered: Any, customer_id: str, last: Any, page_rows: int) -> list[Any]:
        rest: list[Any] = []
        while True:
            query = ordered.where(
                _T.customer_id == customer_id,
                or_(_T.event_time > last.event_time, and_(_T.event_time == last.event_time, _T.id > last.id)),
            ).limit(page_rows)
            with self._db.session(read_only=True) as session:
                rows: list[Any] = list(session.execute(query))
            rest.extend(rows)
            if len(rows) < page_rows:
                return rest
            last = rows[-1]


def _history_batch(rows: list[Any]) -> HistoryBatch:
    columns = list(zip(*rows, strict=True))
    channels = {c.value: c for c in Channel}
    outcomes: dict[str | None, Outcome | None] = {o.value: o for o in Outcome}
    outcomes[None] = None
    return HistoryBatch(
        transaction_ids=columns[1],
        customer_ids=columns[2],
        event_times=columns[3],
        amounts_minor=columns[4],
        currencies=columns[5],
        merchant_ids=columns[6],
        terminal_ids=columns[7],
        mccs=columns[8],
        channels=tuple(channels[c] for c in columns[9]),
        latitudes=columns[10],
        longitudes=columns[11],
        outcomes=tuple(outcomes[o] for o in columns[12]),
        outcome_ats=columns[13],
    )
