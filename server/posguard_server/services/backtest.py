"""Backtests: stored transactions replayed through rules and lists, as if they had been in force.

Each stored transaction of the period is given what live scoring would have given the rules: its fields,
its customer's counters over the windows before it (rebuilt from the customer's stored history, in event
time order, exactly as the profile keeps them: the transactions that count in history, the latest 64 of
the last 24 hours), whether its merchant or terminal was new to the customer, and the stored answer's risk
score and decision. ``Policy.verdict`` then decides, the same function live scoring applies, on top of the
stored decision. Identity declines are left out (no rule or list changes them), and imported history, which
has no answer, counts as approved with risk score 0.

What a backtest cannot know is left at its neutral value: which number or external id a stored transaction
presented (number and external-id lists match live only) and what the numbers' signals were then
(``number.*`` variables read 0 failures, 0 refused codes, never rotated).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from posguard_server.domain.currencies import minor_exponent
from posguard_server.domain.policy import ListEntry, Policy, PolicyInput, PolicyList, Rule
from posguard_server.domain.risk import EARLIEST_EVENT_TIME, Decision, TransactionSource
from posguard_server.store.policy import ReplayRow, SqlPolicyStore

# The longest period a backtest replays in one call (the BacktestRules RPC and the console alike).
MAX_BACKTEST_DAYS = 400
# What the profile keeps (posguard_models.features): the last 24 hours, at most this many transactions.
_RECENT_WINDOW = 86400.0
_RECENT_LIMIT = 64
# Variables that need the customer's whole history, not just the day before the period.
_WHOLE_HISTORY = frozenset(
    {"customer.history", "customer.typical_amount", "customer.new_merchant", "customer.new_terminal"}
)


@dataclass(slots=True)
class DayCounts:
    """What a backtest found over one day (``day`` None: the whole period)."""

    day: date | None
    transactions: int = 0
    fraud: int = 0
    hits: int = 0
    fraud_hits: int = 0
    decisions_changed: int = 0
    declines: int = 0
    reviews: int = 0

    def counts(self) -> dict[str, int]:
        """The counts by name, as reports show them."""
        return {
            "transactions": self.transactions,
            "fraud": self.fraud,
            "hits": self.hits,
            "fraud_hits": self.fraud_hits,
            "decisions_changed": self.decisions_changed,
            "declines": self.declines,
            "reviews": self.reviews,
        }

    def add(self, fraud: bool, hit: bool, changed: bool, decision: Decision) -> None:
        self.transactions += 1
        self.fraud += fraud
        self.hits += hit
        self.fraud_hits += hit and fraud
        self.decisions_changed += changed
        self.declines += decision is Decision.DECLINE
        self.reviews += decision is Decision.REVIEW


@dataclass(slots=True)
class BacktestReport:
    days: list[DayCounts] = field(default_factory=list)
    total: DayCounts = field(default_factory=lambda: DayCounts(None))


@dataclass(slots=True)
class _Customer:
    """A customer's history as the replay walks it."""

    count: int = 0
    sum_log_amount: float = 0.0
    last_time: float = 0.0
    recent: list[tuple[float, float]] = field(default_factory=list)
    merchants: set[str] = field(default_factory=set)
    terminals: set[str] = field(default_factory=set)

    def add(self, at: float, amount: float, merchant: str, terminal: str) -> None:
        self.count += 1
        self.sum_log_amount += math.log1p(amount)
        self.last_time = max(self.last_time, at)
        self.recent.append((at, amount))
        horizon = self.last_time - _RECENT_WINDOW
        recent = [entry for entry in self.recent if entry[0] >= horizon]
        del recent[:-_RECENT_LIMIT]
        self.recent = recent
        self.merchants.add(merchant)
        if terminal:
            self.terminals.add(terminal)


class BacktestService:
    def __init__(self, store: SqlPolicyStore, *, time_zone: str = "UTC") -> None:
        self._store = store
        self._zone = ZoneInfo(time_zone)

    def run(
        self,
        rules: Sequence[Rule],
        lists: Iterable[tuple[PolicyList, Sequence[ListEntry]]],
        *,
        since: datetime,
        until: datetime,
        now: datetime | None = None,
    ) -> BacktestReport:
        """Replay ``[since, until)`` through ``rules`` and ``lists`` (entries unexpired at ``now``)."""
        now = now or datetime.now(UTC)
        chosen = list(lists)
        policy = Policy.build(
            0, [plist for plist, _ in chosen], [entry for _, entries in chosen for entry in entries], rules
        )
        rows = self._store.replay(since=history_start(policy, since), until=until)
        return replay(policy, rows, since=since, now=now, zone=self._zone)


def history_start(policy: Policy, since: datetime) -> datetime:
    """From when a replay from ``since`` must read history, for the counters ``policy`` needs."""
    whole = bool(policy.needs & _WHOLE_HISTORY)
    return EARLIEST_EVENT_TIME if whole else since - timedelta(seconds=_RECENT_WINDOW)


def replay(
    policy: Policy,
    batches: Iterable[Sequence[ReplayRow]],
    *,
    since: datetime,
    now: datetime,
    zone: ZoneInfo,
) -> BacktestReport:
    """Replay transactions through ``policy``: those from ``since`` are decided, the earlier ones are history.

    ``batches`` hold the rows grouped by customer, each customer's in event-time order (as
    ``SqlPolicyStore.replay`` reads them, and as ``evaluate`` builds them from a dataset).
    """
    report = BacktestReport()
    by_day: dict[date, DayCounts] = {}
    at_now = now.timestamp()
    customer_id, customer = "", _Customer()
    for batch in batches:
        for row in batch:
            if row.customer_id != customer_id:
                customer_id, customer = row.customer_id, _Customer()
            amount = _major(row.amount_minor, row.currency)
            at = row.event_time.timestamp()
            identity_decline = row.source is TransactionSource.SCORE and not row.in_history
            if row.event_time >= since and not identity_decline:
                _replay_one(policy, row, customer, amount, at, at_now, zone, report, by_day)
            if row.in_history:
                customer.add(at, amount, row.merchant_id, row.terminal_id)
    report.days = [by_day[day] for day in sorted(by_day)]
    return report


def _replay_one(
    policy: Policy,
    row: ReplayRow,
    customer: _Customer,
    amount: float,
    at: float,
    now: float,
    zone: ZoneInfo,
    report: BacktestReport,
    by_day: dict[date, DayCounts],
) -> None:
    local = row.event_time.astimezone(zone)
    policy_input = PolicyInput(
        customer_id=row.customer_id,
        numbers=(),
        external_id="",
        merchant_id=row.merchant_id,
        terminal_id=row.terminal_id,
        mcc=row.mcc,
        currency=row.currency,
        channel=row.channel.value,
        amount=amount,
        amount_minor=row.amount_minor,
        time=at,
        hour=local.hour,
        weekday=local.isoweekday(),
        history=customer.count,
        typical_amount=math.expm1(customer.sum_log_amount / customer.count) if customer.count else 0.0,
        recent=list(customer.recent),
        new_merchant=row.merchant_id not in customer.merchants,
        new_terminal=bool(row.terminal_id) and row.terminal_id not in customer.terminals,
    )
    decision = row.decision or Decision.APPROVE
    verdict = policy.verdict(policy_input, row.risk_score or 0.0, decision, now=now)
    after = verdict.decision if verdict is not None else decision
    hit = verdict is not None and verdict.hit
    day = row.event_time.astimezone(UTC).date()
    counts = by_day.get(day)
    if counts is None:
        counts = by_day[day] = DayCounts(day)
    for target in (counts, report.total):
        target.add(row.fraud, hit, after is not decision, after)


def _major(amount_minor: int, currency: str) -> float:
    exponent = minor_exponent(currency)
    return amount_minor / float(10 ** (exponent if exponent is not None else 2))
