"""Customers' feature profiles: the state scoring advances, rebuilt after an import, and summaries of it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import and_, case, distinct, func, select

from posguard_server.domain.risk import Decision, ProfileSnapshot, ProfileSummary
from posguard_server.store.risk_tables import (
    CHUNK,
    PROFILE_VALUES,
    PROFILES,
    SqlRiskProfile,
    SqlRiskTransaction,
    chunks,
    insert_for,
    profile_snapshot,
    require_customers,
)

if TYPE_CHECKING:
    from posguard_server.store.db import Database


_T = SqlRiskTransaction


class SqlProfileStore:
    """Customers' profiles and the counts over their stored transactions."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def profile(self, customer_id: str) -> ProfileSnapshot | None:
        with self._db.session(read_only=True) as session:
            row = session.get(SqlRiskProfile, customer_id)
            return profile_snapshot(row) if row is not None else None

    def put_profiles(self, profiles: Sequence[tuple[str, ProfileSnapshot]], *, now: datetime) -> None:
        """Insert or replace customers' profiles in one transaction (rebuilding them after an import)."""
        latest = dict(profiles)
        if not latest:
            return
        with self._db.session() as session:
            require_customers(session, set(latest))
            dialect_insert = insert_for(session)
            statement = dialect_insert(PROFILES)
            statement = statement.on_conflict_do_update(
                index_elements=["customer_id"],
                set_={
                    **{name: statement.excluded[name] for name in PROFILE_VALUES},
                    # A scoring batch that read the profile before this write must not overwrite it.
                    "version": PROFILES.c.version + 1,
                },
            )
            items = list(latest.items())
            for chunk in chunks(items, CHUNK):
                session.execute(
                    statement,
                    [
                        {
                            "customer_id": customer_id,
                            "state": snap.state,
                            "transaction_count": snap.transaction_count,
                            "first_seen": snap.first_seen,
                            "last_seen": snap.last_seen,
                            "declines": snap.declines,
                            "reviews": snap.reviews,
                            "updated_at": now,
                        }
                        for customer_id, snap in chunk
                    ],
                )

    def profile_summary(self, customer_id: str) -> ProfileSummary:
        """Counts over the customer's stored transactions (all zero for a customer without any)."""
        counted = _T.in_history.is_(True)
        with self._db.session(read_only=True) as session:
            totals = session.execute(
                select(
                    func.count(case((counted, 1))),
                    func.min(case((counted, _T.event_time))),
                    func.max(case((counted, _T.event_time))),
                    func.count(case((_T.decision == Decision.DECLINE.value, 1))),
                    func.count(case((_T.decision == Decision.REVIEW.value, 1))),
                    func.count(distinct(case((counted, _T.merchant_id)))),
                    func.count(distinct(case((and_(counted, _T.terminal_id != ""), _T.terminal_id)))),
                ).where(_T.customer_id == customer_id)
            ).one()
            count, first_seen, last_seen, declines, reviews, merchants, terminals = totals
            typical: int | None = None
            currency = ""
            if count:
                currency, in_currency = session.execute(
                    select(_T.currency, func.count())
                    .where(_T.customer_id == customer_id, counted)
                    .group_by(_T.currency)
                    .order_by(func.count().desc(), _T.currency)
                    .limit(1)
                ).one()
                # The lower median by OFFSET over the sorted amounts: SQLite has no percentile function.
                typical = session.scalar(
                    select(_T.amount_minor)
                    .where(_T.customer_id == customer_id, counted, _T.currency == currency)
                    .order_by(_T.amount_minor)
                    .offset((int(in_currency) - 1) // 2)
                    .limit(1)
                )
        return ProfileSummary(
            transaction_count=int(count),
            first_seen=first_seen,
            last_seen=last_seen,
            declines=int(declines),
            reviews=int(reviews),
            distinct_merchants=int(merchants),
            distinct_terminals=int(terminals),
            typical_amount_minor=typical,
            typical_currency=currency,
        )
