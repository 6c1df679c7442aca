"""Enumeration defence: a key that keeps failing verifications or dynamic-code redemptions is refused.

Forged numbers and guessed codes fail; a caller trying many of them is listing what exists. Failures are
counted per API key in fixed windows (``FailureLimit.window``); the failure that reaches the limit refuses the
key until its window ends. A fixed window lets a patient caller reach at most twice the limit across a
boundary, which is enough to stop enumeration and simple enough to count in one row per key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from posguard_server.domain.errors import ResourceExhausted

# The NOT_FOUND reasons that say a customer named by number, external id, customer id or code does not exist:
# a call ending with one of these is a guess (a miss), wherever it came from (an RPC or the console).
MISS_REASONS = frozenset({"NUMBER_NOT_FOUND", "CUSTOMER_NOT_FOUND", "DYNAMIC_CODE_NOT_FOUND"})


@dataclass(frozen=True, slots=True)
class FailureLimit:
    """At most ``failures`` failed verifications or redemptions per key per ``window``; 0 turns it off."""

    failures: int
    window: timedelta

    @property
    def enabled(self) -> bool:
        return self.failures > 0


@dataclass(frozen=True, slots=True)
class FailureWindow:
    """One key's failures since ``started_at``."""

    started_at: datetime
    failures: int


@dataclass(frozen=True, slots=True)
class Counted:
    """The window after a failure; when the key is refused until (None: it is not); whether it just was."""

    window: FailureWindow
    refused_until: datetime | None
    reached_limit: bool


def count_failure(window: FailureWindow | None, now: datetime, limit: FailureLimit) -> Counted:
    """Count one more failure of a key whose current window is ``window`` (None: it never failed)."""
    if window is None or now - window.started_at >= limit.window:
        window = FailureWindow(now, 0)
    window = FailureWindow(window.started_at, window.failures + 1)
    refused = limit.enabled and window.failures >= limit.failures
    return Counted(
        window,
        window.started_at + limit.window if refused else None,
        reached_limit=limit.enabled and window.failures == limit.failures,
    )


def refused_until(window: FailureWindow | None, now: datetime, limit: FailureLimit) -> datetime | None:
    """When a key whose window is ``window`` stops being refused; None when it is not refused now."""
    if not limit.enabled or window is None or now - window.started_at >= limit.window:
        return None
    return window.started_at + limit.window if window.failures >= limit.failures else None


def refusal(until: datetime, now: datetime, *, message: str, reason: str) -> ResourceExhausted:
    """RESOURCE_EXHAUSTED for a caller (or a target) refused until ``until``, with when to retry."""
    retry_after = max(1, math.ceil((until - now) / timedelta(seconds=1)))
    return ResourceExhausted(
        f"{message}; retry in {retry_after} s",
        reason=reason,
        metadata={"retry_after_seconds": str(retry_after)},
    )
