"""The enumeration guard: a key that keeps naming customers that do not exist is refused.

Every RPC that takes a number, an external id, a customer id or a dynamic code counts a miss (the call's
NOT_FOUND, or a verification or redemption judged a guess) against the caller's failure limit
(``domain.enumeration``). Verifications and redemptions count theirs inside their batches; the other RPCs
are wrapped in :func:`guarded`, which refuses a refused key before the call runs and counts the miss the call
ends with. With a million customers and 10^8 serials per prefix, about one guessed number in a hundred hits,
so each RPC that answers differently for "exists" and "does not" must count.

The count lives in the database (``caller_failures``), shared by every server process; which keys are
refused right now lives here, so the check on the hot path costs a dictionary lookup and no query. A process
learns that a key is refused from the misses it records: a key refused elsewhere gets its next miss refused,
uncounted. Misses across all keys are also watched for a spike (a metric and an audit event): many keys
guessing slowly stay under each key's limit, not under this one.

Misses are counted on the database's writer, those that arrive together in one transaction, and a miss is
counted even when its caller gives up before the count is written: a miss is answered only once counted, so
a caller whose deadline is shorter than that wait would otherwise learn from its DEADLINE_EXCEEDED that it
guessed, uncounted. For the same reason the refusal a count ends in is learned here whether or not its caller
waited (``FailureGuard.learns``): otherwise a key past its limit whose callers never wait would still have
its hits answered, and could go on telling them from misses by the delay.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar

from posguard_server.api.group_commit import GroupCommit, Writers
from posguard_server.api.pipeline import current_principal
from posguard_server.domain import enumeration
from posguard_server.domain.enumeration import MISS_REASONS, FailureLimit
from posguard_server.domain.errors import NotFound, PosguardError, ResourceExhausted
from posguard_server.store.caller_limits import Missed, Spike

if TYPE_CHECKING:
    from posguard_server.api.metrics import Metrics
    from posguard_server.store.caller_limits import SqlGuessStore

log = logging.getLogger(__name__)

SPIKE_SECONDS = 60
# Misses counted in one transaction at most.
_MISS_BATCH = 64


def _now() -> datetime:
    return datetime.now(UTC)


class FailureGuard:
    """Refuses keys past their failure limit, counts misses, and watches misses across all keys.

    ``spike_limit`` misses (all keys, this process) within ``SPIKE_SECONDS`` make a spike: counted in the
    ``posguard_guess_spikes`` metric, logged, and audited once per window (0: not watched).
    """

    def __init__(
        self,
        limit: FailureLimit,
        store: SqlGuessStore,
        metrics: Metrics,
        writers: Writers,
        *,
        spike_limit: int,
    ) -> None:
        self.limit = limit
        self._misses = GroupCommit(store.count_misses, limit=_MISS_BATCH, writers=writers)
        self._spikes = GroupCommit(store.record_spikes, limit=1, writers=writers)
        self._metrics = metrics
        self._spike_limit = spike_limit
        self._refused_until: dict[str, datetime] = {}  # one entry per API key at most
        self._window_started = time.monotonic()
        self._window_misses = 0

    def check(self, caller: str, now: datetime) -> None:
        """Raise RESOURCE_EXHAUSTED (reason ``TOO_MANY_FAILURES``) while ``caller`` is refused."""
        until = self._refused_until.get(caller)
        if until is None:
            return
        if now >= until:
            del self._refused_until[caller]
            return
        raise refusal(until, now)

    def learns(self, caller: str) -> Callable[[GuessCounted], None]:
        """What takes a counted guess of ``caller`` (a miss, a verification, a redemption) and refuses the
        caller here until the count says (if it does).

        Handed to the writer with the guess (``GroupCommit.submit(then=…)``), so that a key past its limit is
        refused here even when the caller of the guess that reached the limit did not wait for its answer.
        """

        def learn(counted: GuessCounted) -> None:
            if counted.refused_until is not None:
                self._refused_until[caller] = counted.refused_until

        return learn

    async def missed(self, caller: str, method: str, error: NotFound) -> PosguardError:
        """Count the miss a call of ``method`` is about to answer with ``error``; returns what to answer.

        That is ``error``, or the refusal when another process refused the caller already (then the miss
        is not counted, and the caller does not learn that the customer does not exist).
        """
        missed = Missed(caller, method, error.reason)
        miss = await self._misses.submit(missed, detached=True, then=self.learns(caller))
        if miss.refused:
            assert miss.refused_until is not None
            return refusal(miss.refused_until, _now())
        await self.observe(method)
        return error

    async def observe(self, method: str, misses: int = 1) -> None:
        """Count ``misses`` counted guesses of ``method`` in the metrics, and report a spike across keys."""
        if misses <= 0:
            return
        self._metrics.guesses.labels(method).inc(misses)
        if self._spike_limit <= 0:
            return
        started = time.monotonic()
        if started - self._window_started >= SPIKE_SECONDS:
            self._window_started, self._window_misses = started, 0
        before = self._window_misses
        self._window_misses += misses
        if before < self._spike_limit <= self._window_misses:  # once per window, when the limit is crossed
            self._metrics.guess_spikes.inc()
            log.warning(
                "guessing spike: %d misses across all keys within %d s (limit %d)",
                self._window_misses,
                SPIKE_SECONDS,
                self._spike_limit,
            )
            try:
                await self._spikes.submit(Spike(self._window_misses, SPIKE_SECONDS), detached=True)
            except Exception:  # the call it rides on was answered already; the warning above still stands
                log.warning("could not audit the guessing spike", exc_info=True)


def refusal(until: datetime, now: datetime) -> ResourceExhausted:
    """The error for a call from a key refused ``until``."""
    return enumeration.refusal(
        until,
        now,
        message="too many calls naming customers that do not exist from this key",
        reason="TOO_MANY_FAILURES",
    )


class GuessCounted(Protocol):
    """A guess as counted: when its caller is refused until (None: not refused)."""

    @property
    def refused_until(self) -> datetime | None: ...


class _Guarded(Protocol):
    @property
    def _guard(self) -> FailureGuard: ...


S = TypeVar("S", bound=_Guarded)
P = ParamSpec("P")
R = TypeVar("R")


def guarded(
    rpc: Callable[Concatenate[S, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
    """An RPC that names a customer: a refused caller is refused first, and a miss it ends with counts."""
    method = rpc.__name__

    @functools.wraps(rpc)
    async def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        guard = self._guard
        caller = current_principal().key_id
        guard.check(caller, _now())
        try:
            return await rpc(self, *args, **kwargs)
        except NotFound as error:
            if error.reason not in MISS_REASONS:
                raise
            raise await guard.missed(caller, method, error) from None

    return wrapper
