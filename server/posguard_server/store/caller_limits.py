"""Each API key's failures in its current window, counted in the database (``domain.enumeration``).

A batch of verifications or redemptions locks the rows of its callers first, in one order (creating the
rows it lacks), counts their failures in memory as it decides, and writes the rows back once. Locking them
first keeps every path in one lock order (caller rows, then what the calls touch, then the audit head), so
concurrent batches on PostgreSQL wait for each other instead of deadlocking. Reading the count under the
lock also lets a batch refuse at once a key that reached its limit in another process.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import BigInteger, Integer, String, bindparam, func, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from posguard_server.domain.enumeration import FailureLimit, FailureWindow, count_failure, refused_until
from posguard_server.store.audit import NewEvent, append_events
from posguard_server.store.schema import PRINCIPAL_MAX, Base, insert_for

if TYPE_CHECKING:
    from sqlalchemy import Table

    from posguard_server.store.db import Database
    from posguard_server.store.driver import Runs


class SqlCallerFailures(Base):
    """Failed verifications and code redemptions of one API key in its current window (enumeration)."""

    __tablename__ = "caller_failures"

    caller: Mapped[str] = mapped_column(String(PRINCIPAL_MAX), primary_key=True)
    window_started_at: Mapped[datetime]
    window_failures: Mapped[int] = mapped_column(Integer)
    times_refused: Mapped[int] = mapped_column(BigInteger)
    last_refused_at: Mapped[datetime | None]


_table = cast("Table", SqlCallerFailures.__table__)
_c = _table.c
_LOCK = (
    select(_c.caller, _c.window_started_at, _c.window_failures)
    .where(_c.caller.in_(bindparam("callers", expanding=True)))
    .order_by(_c.caller)
    .with_for_update()
)
_SAVE = (
    update(_table)
    .where(_c.caller == bindparam("b_caller"))
    .values(
        window_started_at=bindparam("b_started", type_=_c.window_started_at.type),
        window_failures=bindparam("b_failures"),
        times_refused=_c.times_refused + bindparam("b_refused"),
        last_refused_at=func.coalesce(
            bindparam("b_refused_at", type_=_c.last_refused_at.type), _c.last_refused_at
        ),
    )
)


@functools.cache
def _add_missing(dialect: str) -> Any:
    return insert_for(dialect)(_table).on_conflict_do_nothing()


class CallerLimits:
    """The failure windows of ``callers``, locked until the transaction of ``connection`` ends."""

    def __init__(
        self, connection: Runs, limit: FailureLimit, callers: Collection[str], now: datetime
    ) -> None:
        self._limit = limit
        self._now = now
        self._windows: dict[str, FailureWindow] = {}
        self._changed: set[str] = set()
        self.reached: list[str] = []  # the callers whose failure in this batch reached the limit
        if not limit.enabled or not callers:
            return
        ordered = sorted(callers)
        connection.execute(
            _add_missing(connection.dialect.name),
            [
                {"caller": c, "window_started_at": now, "window_failures": 0, "times_refused": 0}
                for c in ordered
            ],
        )
        for row in connection.execute(_LOCK, {"callers": ordered}):
            self._windows[row.caller] = FailureWindow(row.window_started_at, row.window_failures)

    def refused_until(self, caller: str) -> datetime | None:
        """When ``caller`` stops being refused; None when it is not refused now."""
        return refused_until(self._windows.get(caller), self._now, self._limit)

    def count(self, caller: str) -> datetime | None:
        """Count a failure of ``caller`` (one of the callers locked); returns when it is refused until."""
        if not self._limit.enabled:
            return None
        counted = count_failure(self._windows.get(caller), self._now, self._limit)
        self._windows[caller] = counted.window
        self._changed.add(caller)
        if counted.reached_limit:
            self.reached.append(caller)
        return counted.refused_until

    def save(self, on: Session | Runs, method: str | Mapping[str, str]) -> None:
        """Write the counts back, and audit each caller this batch refused (the last write: see audit).

        ``on``: the unit's session, or the connection of a unit that runs Core statements only. ``method``:
        the RPC the refusals are audited under, the batch's, or by caller (a batch of several RPCs' misses).
        """
        if self._changed:
            connection = on.connection() if isinstance(on, Session) else on
            connection.execute(
                _SAVE,
                [
                    {
                        "b_caller": caller,
                        "b_started": self._windows[caller].started_at,
                        "b_failures": self._windows[caller].failures,
                        "b_refused": self.reached.count(caller),
                        "b_refused_at": self._now if caller in self.reached else None,
                    }
                    for caller in sorted(self._changed)
                ],
            )
        limit = {
            "failures": str(self._limit.failures),
            "window_seconds": str(int(self._limit.window.total_seconds())),
        }
        refused = [
            NewEvent(
                caller,
                "caller.refused",
                caller,
                {"method": method if isinstance(method, str) else method[caller], **limit},
            )
            for caller in self.reached
        ]
        append_events(on, refused, self._now)


# The audit actions of guessing: a lookup that named nothing, and a spike of them across all keys.
MISSED = "lookup.missed"
SPIKE = "guessing.spike"


@dataclass(frozen=True, slots=True)
class Missed:
    """A lookup of ``caller``'s call of ``method`` that named nobody (``reason``: what was not found)."""

    caller: str
    method: str
    reason: str


@dataclass(frozen=True, slots=True)
class Miss:
    """A lookup miss recorded: when its caller is refused until (None: not refused), and ``refused`` when
    the caller was refused already (by another process), so the miss was not counted and gets no answer."""

    refused_until: datetime | None
    refused: bool = False


@dataclass(frozen=True, slots=True)
class Spike:
    """``misses`` misses across all keys within ``seconds`` on one server process."""

    misses: int
    seconds: int


class SqlGuessStore:
    """Misses of lookups by number, external id, customer id or dynamic code, outside the gateway batches.

    Verifications and redemptions count their guesses in their own batches; every other RPC that names a
    customer counts a miss here. Concurrent misses share a transaction (``count_misses``, on the database's
    writer, see ``api.enumeration``); the callers' rows are locked, so concurrent misses of one key never
    count past the limit, in one process or several.
    """

    def __init__(self, database: Database, limit: FailureLimit) -> None:
        self._db = database
        self._limit = limit

    def count_misses(self, items: Sequence[Missed]) -> list[Miss]:
        """Count each miss against its caller's limit and audit it, in order, in one transaction.

        A caller refused already (by another process, or by an earlier miss of the batch) gets its miss
        refused, uncounted, as a verification would.
        """
        now = datetime.now(UTC)
        with self._db.statements_unit() as connection:
            limits = CallerLimits(connection, self._limit, {item.caller for item in items}, now)
            answers: list[Miss] = []
            events: list[NewEvent] = []
            refused_by: dict[str, str] = {}  # the method of the miss that reached each caller's limit
            for item in items:
                until = limits.refused_until(item.caller)
                if until is not None:
                    answers.append(Miss(until, refused=True))
                    continue
                until = limits.count(item.caller)
                if until is not None:
                    refused_by.setdefault(item.caller, item.method)
                details = {"method": item.method, "reason": item.reason}
                events.append(NewEvent(item.caller, MISSED, item.caller, details))
                answers.append(Miss(until))
            with connection.together():
                append_events(connection, events, now)
                limits.save(connection, refused_by)
            return answers

    def record_spikes(self, spikes: Sequence[Spike]) -> list[None]:
        """Audit each spike of misses across all keys."""
        now = datetime.now(UTC)
        events = [
            NewEvent(
                "posguard", SPIKE, "all keys", {"misses": str(s.misses), "window_seconds": str(s.seconds)}
            )
            for s in spikes
        ]
        with self._db.statements_unit() as connection:
            append_events(connection, events, now)
        return [None] * len(spikes)
