"""Lists and rules in the database, and the reads a backtest replays.

Every change (a list created, an entry added or removed, a rule version created, activated or retired) is
one transaction that also bumps a one-row generation counter and appends an audit event, as model
promotions do: servers compare the generation every ``model_refresh_seconds`` and reload the whole policy
when it moved, so a change reaches every server within that interval. Mutations are idempotent by request_id
(the caller's own key, see ``store.idempotency``): a retry answers with the state the first call left.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import zip_longest
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    bindparam,
    case,
    func,
    literal_column,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.orm import Mapped, mapped_column

from posguard_server.domain.errors import FailedPrecondition, InvalidArgument, NotFound
from posguard_server.domain.policy import (
    NEVER_ROTATED_DAYS,
    ListEntry,
    ListKind,
    ListType,
    NumberSignals,
    PolicyList,
    Rule,
    RuleAction,
    RuleStatus,
)
from posguard_server.domain.risk import Channel, Decision, TransactionSource
from posguard_server.store.audit import append_event
from posguard_server.store.customers import SqlCustomerNumber
from posguard_server.store.dynamic_codes import SqlDynamicEnrollment
from posguard_server.store.idempotency import earlier_call, record_call
from posguard_server.store.risk_tables import CHUNK, FRAUD_LABELS, SqlRiskTransaction, chunks, insert_for
from posguard_server.store.schema import PRINCIPAL_MAX, Base, utc

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from posguard_server.store.db import Database
    from posguard_server.store.driver import Runs

NAME_MAX = 64
VALUE_MAX = 128
TEXT_MAX = 500
CONDITION_MAX = 2000
_GENERATION_ID = 1


def _in_list(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class SqlPolicyList(Base):
    __tablename__ = "policy_lists"
    __table_args__ = (
        CheckConstraint(_in_list("kind", [k.value for k in ListKind]), name="kind"),
        CheckConstraint(_in_list("type", [t.value for t in ListType]), name="type"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    type: Mapped[str] = mapped_column(String(8))
    description: Mapped[str] = mapped_column(String(TEXT_MAX))
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(PRINCIPAL_MAX))


class SqlPolicyListEntry(Base):
    __tablename__ = "policy_list_entries"
    __table_args__ = (UniqueConstraint("list_id", "value"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    list_id: Mapped[int] = mapped_column(Integer, ForeignKey("policy_lists.id"))
    value: Mapped[str] = mapped_column(String(VALUE_MAX))
    reason: Mapped[str] = mapped_column(String(TEXT_MAX))
    author: Mapped[str] = mapped_column(String(PRINCIPAL_MAX))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]


class SqlPolicyRule(Base):
    __tablename__ = "policy_rules"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        CheckConstraint(_in_list("status", [s.value for s in RuleStatus]), name="status"),
        CheckConstraint(_in_list("action", [a.value for a in RuleAction]), name="action"),
        Index("ix_policy_rules_status", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX))
    version: Mapped[int] = mapped_column(Integer)
    condition: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(String(8))
    reason: Mapped[str] = mapped_column(String(TEXT_MAX))
    status: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(PRINCIPAL_MAX))
    activated_at: Mapped[datetime | None]
    retired_at: Mapped[datetime | None]


class SqlPolicyGeneration(Base):
    """One row counting policy changes; servers compare it to decide whether to reload lists and rules."""

    __tablename__ = "policy_generation"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    generation: Mapped[int] = mapped_column(Integer)
    changed_at: Mapped[datetime]


_L, _E, _R, _G = SqlPolicyList, SqlPolicyListEntry, SqlPolicyRule, SqlPolicyGeneration


@dataclass(frozen=True, slots=True)
class PolicyState:
    """What a server loads: the generation, every list, their unexpired entries and the active rules."""

    generation: int
    lists: list[PolicyList]
    entries: list[ListEntry]
    rules: list[Rule]


@dataclass(frozen=True, slots=True)
class ReplayRow:
    """A stored transaction as a backtest replays it (``decision`` None for imported history)."""

    transaction_id: str
    customer_id: str
    event_time: datetime
    amount_minor: int
    currency: str
    merchant_id: str
    terminal_id: str
    mcc: str
    channel: Channel
    in_history: bool
    source: TransactionSource
    risk_score: float | None
    decision: Decision | None
    reason_codes: tuple[str, ...]
    fraud: bool


class SqlPolicyStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    # -- reads ----------------------------------------------------------------------------------------

    def generation(self) -> int:
        with self._db.session(read_only=True) as session:
            value = session.scalar(select(_G.generation).where(_G.id == _GENERATION_ID))
            return int(value) if value is not None else 0

    def state(self, now: datetime) -> PolicyState:
        """Everything a server holds in memory, read in one transaction."""
        with self._db.session(read_only=True) as session:
            generation = session.scalar(select(_G.generation).where(_G.id == _GENERATION_ID)) or 0
            lists = {row.id: row for row in session.scalars(select(_L))}
            entries = [
                _entry(row, lists[row.list_id].name)
                for row in session.scalars(
                    select(_E).where(or_(_E.expires_at.is_(None), _E.expires_at > utc(now)))
                )
            ]
            rules = [
                _rule(row) for row in session.scalars(select(_R).where(_R.status == RuleStatus.ACTIVE.value))
            ]
            return PolicyState(int(generation), [_list(row) for row in lists.values()], entries, rules)

    def list_lists(self, now: datetime) -> list[PolicyList]:
        with self._db.session(read_only=True) as session:
            counts = dict(
                session.execute(
                    select(_E.list_id, func.count())
                    .where(or_(_E.expires_at.is_(None), _E.expires_at > utc(now)))
                    .group_by(_E.list_id)
                ).all()
            )
            return [
                _list(row, counts.get(row.id, 0)) for row in session.scalars(select(_L).order_by(_L.name))
            ]

    def get_list(self, name: str) -> PolicyList:
        with self._db.session(read_only=True) as session:
            return _list(_find_list(session, name))

    def list_entries(
        self, name: str, *, now: datetime, include_expired: bool, limit: int, after: int | None
    ) -> tuple[list[ListEntry], int | None]:
        with self._db.session(read_only=True) as session:
            plist = _find_list(session, name)
            query = select(_E).where(_E.list_id == plist.id).order_by(_E.id).limit(limit + 1)
            if not include_expired:
                query = query.where(or_(_E.expires_at.is_(None), _E.expires_at > utc(now)))
            if after is not None:
                query = query.where(_E.id > after)
            rows = list(session.scalars(query))
            more = len(rows) > limit
            rows = rows[:limit]
            return [_entry(row, plist.name) for row in rows], (rows[-1].id if more else None)

    def list_rules(self, *, name: str, status: RuleStatus | None) -> list[Rule]:
        query = select(_R).order_by(_R.name, _R.version.desc())
        if name:
            query = query.where(_R.name == name)
        if status is not None:
            query = query.where(_R.status == status.value)
        with self._db.session(read_only=True) as session:
            return [_rule(row) for row in session.scalars(query)]

    def get_rule(self, name: str, version: int) -> Rule:
        """A rule's version; 0 names the newest version."""
        with self._db.session(read_only=True) as session:
            return _rule(_find_rule(session, name, version))

    # -- lists ----------------------------------------------------------------------------------------

    def create_list(
        self,
        name: str,
        kind: ListKind,
        list_type: ListType,
        description: str,
        *,
        actor: str,
        now: datetime,
        request_id: str,
        fingerprint: str,
    ) -> PolicyList:
        method = "policy.list.created"
        with self._db.session() as session:
            if request_id and earlier_call(session, method, actor, request_id, fingerprint) is not None:
                return _list(_find_list(session, name))
            if session.scalar(select(_L.id).where(_L.name == name)) is not None:
                raise InvalidArgument.field("name", "is the name of an existing list", reason="LIST_EXISTS")
            row = _L(
                name=name,
                kind=kind.value,
                type=list_type.value,
                description=description,
                created_at=utc(now),
                created_by=actor,
            )
            session.add(row)
            session.flush()
            self._changed(
                session,
                method,
                actor,
                request_id,
                fingerprint,
                now,
                subject=name,
                details={"kind": kind.value, "type": list_type.value},
            )
            return _list(row)

    def add_entry(
        self,
        list_name: str,
        value: str,
        *,
        reason: str,
        expires_at: datetime | None,
        actor: str,
        now: datetime,
        request_id: str,
        fingerprint: str,
    ) -> ListEntry:
        """Add ``value`` to a list, or replace its entry (reason, author, expiry) when it is there already."""
        method = "policy.list.entry_added"
        with self._db.session() as session:
            plist = _find_list(session, list_name)
            existing = session.scalar(select(_E).where(_E.list_id == plist.id, _E.value == value))
            if request_id and earlier_call(session, method, actor, request_id, fingerprint) is not None:
                if existing is None:
                    raise FailedPrecondition(
                        "the entry this request added was removed since", reason="LIST_ENTRY_REMOVED"
                    )
                return _entry(existing, plist.name)
            if existing is None:
                existing = _E(list_id=plist.id, value=value)
                session.add(existing)
            existing.reason = reason
            existing.author = actor
            existing.created_at = utc(now)
            existing.expires_at = utc(expires_at) if expires_at is not None else None
            session.flush()
            details = {"value": value, "reason": reason}
            if expires_at is not None:
                details["expires_at"] = utc(expires_at).isoformat()
            self._changed(
                session, method, actor, request_id, fingerprint, now, subject=list_name, details=details
            )
            return _entry(existing, plist.name)

    def remove_entry(
        self,
        list_name: str,
        value: str,
        *,
        reason: str,
        actor: str,
        now: datetime,
        request_id: str,
        fingerprint: str,
    ) -> bool:
        """Remove ``value`` from a list; False when it was not there (nothing changes, nothing is audited)."""
        method = "policy.list.entry_removed"
        with self._db.session() as session:
            plist = _find_list(session, list_name)
            if request_id and earlier_call(session, method, actor, request_id, fingerprint) is not None:
                return True
            found = session.scalar(select(_E).where(_E.list_id == plist.id, _E.value == value))
            if found is None:
                return False
            session.delete(found)
            session.flush()
            self._changed(
                session,
                method,
                actor,
                request_id,
                fingerprint,
                now,
                subject=list_name,
                details={"value": value, "reason": reason},
            )
            return True

    # -- rules ----------------------------------------------------------------------------------------

    def create_rule(
        self,
        name: str,
        condition: str,
        action: RuleAction,
        reason: str,
        *,
        actor: str,
        now: datetime,
        request_id: str,
        fingerprint: str,
    ) -> Rule:
        """A new DRAFT version of rule ``name`` (version 1 for a new name). The caller compiled it."""
        method = "policy.rule.created"
        with self._db.session() as session:
            if request_id:
                done = earlier_call(session, method, actor, request_id, fingerprint)
                if done is not None:
                    row = session.scalar(
                        select(_R).where(
                            _R.name == name, _R.created_by == actor, _R.created_at == done.created_at
                        )
                    )
                    if row is not None:
                        return _rule(row)
            _lock_generation(session, now)  # versions are numbered one after the other across servers
            latest = session.scalar(select(func.max(_R.version)).where(_R.name == name)) or 0
            row = _R(
                name=name,
                version=latest + 1,
                condition=condition,
                action=action.value,
                reason=reason,
                status=RuleStatus.DRAFT.value,
                created_at=utc(now),
                created_by=actor,
                activated_at=None,
                retired_at=None,
            )
            session.add(row)
            session.flush()
            # A draft changes nothing servers hold: audited, no generation bump.
            if request_id:
                record_call(session, method, actor, request_id, fingerprint, customer_id="", now=utc(now))
            append_event(
                session,
                actor=actor,
                action=method,
                subject=f"{name}@{row.version}",
                details={"action": action.value, "condition": condition[:1000], "reason": reason},
                now=now,
            )
            return _rule(row)

    def activate_rule(
        self,
        name: str,
        version: int,
        *,
        reason: str,
        actor: str,
        now: datetime,
        request_id: str,
        fingerprint: str,
    ) -> tuple[Rule, int]:
        """Make a DRAFT version active, retiring the active version of the name; (rule, retired version)."""
        method = "policy.rule.activated"
        with self._db.session() as session:
            replay = request_id and earlier_call(session, method, actor, request_id, fingerprint) is not None
            _lock_generation(session, now)
            row = _find_rule(session, name, version)
            if replay:
                return _rule(row), 0
            if row.status != RuleStatus.DRAFT.value:
                raise FailedPrecondition(
                    f"version {row.version} of rule {name} is {row.status.lower()}; only a draft is "
                    "activated",
                    reason="RULE_NOT_DRAFT",
                )
            retired = 0
            previous = session.scalar(
                select(_R).where(_R.name == name, _R.status == RuleStatus.ACTIVE.value).with_for_update()
            )
            if previous is not None:
                previous.status, previous.retired_at = RuleStatus.RETIRED.value, utc(now)
                retired = previous.version
            row.status, row.activated_at = RuleStatus.ACTIVE.value, utc(now)
            session.flush()
            details = {"reason": reason, "version": str(row.version)}
            if retired:
                details["retired_version"] = str(retired)
            self._changed(
                session,
                method,
                actor,
                request_id,
                fingerprint,
                now,
                subject=name,
                details=details,
                lock=False,
            )
            return _rule(row), retired

    def retire_rule(
        self,
        name: str,
        *,
        reason: str,
        actor: str,
        now: datetime,
        request_id: str,
        fingerprint: str,
    ) -> Rule:
        """Retire the active version of ``name`` (it stops deciding); FailedPrecondition when none is."""
        method = "policy.rule.retired"
        with self._db.session() as session:
            replay = request_id and earlier_call(session, method, actor, request_id, fingerprint) is not None
            _lock_generation(session, now)
            if replay:
                return _rule(_find_rule(session, name, 0))
            row = session.scalar(select(_R).where(_R.name == name, _R.status == RuleStatus.ACTIVE.value))
            if row is None:
                _find_rule(session, name, 0)  # NotFound for a name that has no version at all
                raise FailedPrecondition(f"rule {name} has no active version", reason="RULE_NOT_ACTIVE")
            row.status, row.retired_at = RuleStatus.RETIRED.value, utc(now)
            session.flush()
            self._changed(
                session,
                method,
                actor,
                request_id,
                fingerprint,
                now,
                subject=name,
                details={"reason": reason, "version": str(row.version)},
                lock=False,
            )
            return _rule(row)

    def _changed(
        self,
        session: Session,
        method: str,
        actor: str,
        request_id: str,
        fingerprint: str,
        now: datetime,
        *,
        subject: str,
        details: dict[str, str],
        lock: bool = True,
    ) -> None:
        """Record a change servers must pick up: the generation moves, the key is kept, the event appended."""
        if lock:
            _lock_generation(session, now)
        session.execute(
            update(_G)
            .where(_G.id == _GENERATION_ID)
            .values(generation=_G.generation + 1, changed_at=utc(now))
        )
        if request_id:
            details = {**details, "request_id": request_id}
            record_call(session, method, actor, request_id, fingerprint, customer_id="", now=utc(now))
        append_event(session, actor=actor, action=method, subject=subject, details=details, now=now)

    # -- backtest reads -------------------------------------------------------------------------------

    def replay(self, *, since: datetime, until: datetime, batch: int = 5000) -> Iterator[list[ReplayRow]]:
        """Stored transactions with ``since <= event_time < until``, in batches of whole customers, each
        customer's in (event_time, id) order."""
        t = SqlRiskTransaction
        query = (
            select(
                t.transaction_id,
                t.customer_id,
                t.event_time,
                t.amount_minor,
                t.currency,
                t.merchant_id,
                t.terminal_id,
                t.mcc,
                t.channel,
                t.in_history,
                t.source,
                t.risk_score,
                t.decision,
                t.reasons,
                t.outcome,
            )
            .where(t.event_time >= utc(since), t.event_time < utc(until))
            .order_by(t.customer_id, t.event_time, t.id)
        )
        with self._db.session(read_only=True) as session:
            pending: list[ReplayRow] = []
            for row in session.execute(query.execution_options(yield_per=batch)):
                if len(pending) >= batch and pending[-1].customer_id != row.customer_id:
                    yield pending
                    pending = []
                pending.append(_replay_row(row))
            if pending:
                yield pending


# -- what rules read in the scoring unit ----------------------------------------------------------------

_T = SqlRiskTransaction
_MERCHANT, _TERMINAL = "m", "t"


def _seen(kind: str, column: Any, places: str) -> Any:
    return (
        select(_T.customer_id, literal_column(f"'{kind}'").label("kind"), column)
        .where(
            _T.customer_id.in_(bindparam("customers", expanding=True)),
            column.in_(bindparam(places, expanding=True)),
            _T.in_history.is_(True),
        )
        .distinct()
    )


# Both kinds of place in one statement: a batch pays one round trip and one SQLAlchemy execution for them,
# each half still a probe of its covering index (revision 0014).
_SEEN_PLACES = union_all(
    _seen(_MERCHANT, _T.merchant_id, "merchants"), _seen(_TERMINAL, _T.terminal_id, "terminals")
)
_N = SqlCustomerNumber
_ENROLMENT = SqlDynamicEnrollment
# One statement for every number signal: the enrolment's replays (at most one enrolment per customer) ride
# along as a correlated scalar subquery.
_NUMBER_SIGNALS = (
    select(
        _N.customer_id,
        func.sum(_N.failed_verifications),
        func.max(case((_N.status == "rotated", _N.status_changed_at))),
        select(_ENROLMENT.replays).where(_ENROLMENT.customer_id == _N.customer_id).scalar_subquery(),
    )
    .where(_N.customer_id.in_(bindparam("customers", expanding=True)))
    .group_by(_N.customer_id)
)


def places_seen(
    connection: Runs, customers: set[str], merchants: set[str], terminals: set[str]
) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """The (customer, merchant) and (customer, terminal) pairs among these that history already holds."""
    seen_merchants: set[tuple[str, str]] = set()
    seen_terminals: set[tuple[str, str]] = set()
    terminals = {t for t in terminals if t}
    if not merchants and not terminals:
        return seen_merchants, seen_terminals
    customer_chunks = list(chunks(sorted(customers), CHUNK))
    merchant_chunks, terminal_chunks = chunks(sorted(merchants), CHUNK), chunks(sorted(terminals), CHUNK)
    for merchant_chunk, terminal_chunk in zip_longest(merchant_chunks, terminal_chunks, fillvalue=()):
        for chunk in customer_chunks:
            parameters = {"customers": chunk, "merchants": merchant_chunk, "terminals": terminal_chunk}
            for customer, kind, place in connection.execute(_SEEN_PLACES, parameters):
                (seen_merchants if kind == _MERCHANT else seen_terminals).add((customer, place))
    return seen_merchants, seen_terminals


def number_signals(connection: Runs, customers: set[str], now: datetime) -> dict[str, NumberSignals]:
    """Per customer: failed verifications of their numbers, replayed codes, days since the last rotation."""
    found: dict[str, NumberSignals] = {}
    for chunk in chunks(sorted(customers), CHUNK):
        for customer, failed, rotated, replays in connection.execute(_NUMBER_SIGNALS, {"customers": chunk}):
            days = NEVER_ROTATED_DAYS
            if rotated is not None:
                rotated_at = (
                    rotated if isinstance(rotated, datetime) else datetime.fromisoformat(str(rotated))
                )
                if rotated_at.tzinfo is None:
                    rotated_at = rotated_at.replace(tzinfo=UTC)
                days = max(0.0, (now - rotated_at).total_seconds() / 86400.0)
            found[customer] = NumberSignals(int(failed or 0), int(replays or 0), days)
    return found


def _replay_row(row: Any) -> ReplayRow:
    codes = tuple(item["code"] for item in json.loads(row.reasons)) if row.reasons else ()
    return ReplayRow(
        transaction_id=row.transaction_id,
        customer_id=row.customer_id,
        event_time=row.event_time,
        amount_minor=row.amount_minor,
        currency=row.currency,
        merchant_id=row.merchant_id,
        terminal_id=row.terminal_id,
        mcc=row.mcc,
        channel=Channel(row.channel),
        in_history=bool(row.in_history),
        source=TransactionSource(row.source),
        risk_score=row.risk_score,
        decision=Decision(row.decision) if row.decision is not None else None,
        reason_codes=codes,
        fraud=row.outcome in FRAUD_LABELS,
    )


def _lock_generation(session: Session, now: datetime) -> None:
    """Serialise policy changes across servers on the generation row (created on first use)."""
    session.execute(
        insert_for(session)(_G.__table__)
        .values(id=_GENERATION_ID, generation=0, changed_at=utc(now))
        .on_conflict_do_nothing(index_elements=["id"])
    )
    session.execute(select(_G.id).where(_G.id == _GENERATION_ID).with_for_update())


def _find_list(session: Session, name: str) -> SqlPolicyList:
    row = session.scalar(select(_L).where(_L.name == name))
    if row is None:
        raise NotFound("no list has this name", reason="LIST_NOT_FOUND")
    return row


def _find_rule(session: Session, name: str, version: int) -> SqlPolicyRule:
    query = select(_R).where(_R.name == name)
    query = query.where(_R.version == version) if version else query.order_by(_R.version.desc()).limit(1)
    row = session.scalar(query)
    if row is None:
        raise NotFound("no rule has this name and version", reason="RULE_NOT_FOUND")
    return row


def _list(row: SqlPolicyList, entries: int = 0) -> PolicyList:
    return PolicyList(
        name=row.name,
        kind=ListKind(row.kind),
        type=ListType(row.type),
        description=row.description,
        created_at=row.created_at,
        created_by=row.created_by,
        entries=entries,
    )


def _entry(row: SqlPolicyListEntry, list_name: str) -> ListEntry:
    return ListEntry(
        list_name=list_name,
        value=row.value,
        reason=row.reason,
        author=row.author,
        created_at=row.created_at,
        expires_at=row.expires_at,
    )


def _rule(row: SqlPolicyRule) -> Rule:
    return Rule(
        name=row.name,
        version=row.version,
        condition=row.condition,
        action=RuleAction(row.action),
        reason=row.reason,
        status=RuleStatus(row.status),
        created_at=row.created_at,
        created_by=row.created_by,
        activated_at=row.activated_at,
        retired_at=row.retired_at,
    )
