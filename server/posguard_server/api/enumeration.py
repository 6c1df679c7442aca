"""The enumeration guard: refuses verifications and redemptions from a key that failed too many of them.

The count lives in the database (``caller_failures``), shared by every server process; which keys are
refused right now lives here, so the check on the hot path costs a dictionary lookup and no query. A process
learns that a key is refused from the failures it records: a key refused elsewhere gets its next guessed
number refused, uncounted (``store.verifications``), and at most one more failed redemption counted.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from posguard_server.domain.enumeration import FailureLimit
from posguard_server.domain.errors import ResourceExhausted


class FailureGuard:
    def __init__(self, limit: FailureLimit) -> None:
        self.limit = limit
        self._refused_until: dict[str, datetime] = {}  # one entry per API key at most

    def check(self, caller: str, now: datetime) -> None:
        """Raise RESOURCE_EXHAUSTED (reason ``TOO_MANY_FAILURES``) while ``caller`` is refused."""
        until = self._refused_until.get(caller)
        if until is None:
            return
        if now >= until:
            del self._refused_until[caller]
            return
        raise refusal(until, now)

    def refuse(self, caller: str, until: datetime | None) -> None:
        """Refuse ``caller`` until ``until`` (what recording its failure returned; None: not refused)."""
        if until is not None:
            self._refused_until[caller] = until


def refusal(until: datetime, now: datetime) -> ResourceExhausted:
    """The error for a call from a key refused ``until``."""
    retry_after = max(1, math.ceil((until - now) / timedelta(seconds=1)))
    return ResourceExhausted(
        f"too many failed verifications or redemptions from this key; retry in {retry_after} s",
        reason="TOO_MANY_FAILURES",
        metadata={"retry_after_seconds": str(retry_after)},
    )
