"""Review cases: what a case is, its states, and which resolutions fit which kind of case.

A case opens OPEN (a transaction scored REVIEW, or DECLINE by setting; or a number the watch flagged), may be
ASSIGNED (again and again, to reassign it), and is RESOLVED once; nothing leaves RESOLVED.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass
from datetime import datetime

from posguard_server.domain.risk import Decision, Outcome, StoredReason

CASE_ID_LENGTH = 16
ASSIGNEE_MAX = 100


class CaseKind(enum.Enum):
    TRANSACTION = "transaction"
    NUMBER_WATCH = "number_watch"


class CaseStatus(enum.Enum):
    OPEN = "open"
    ASSIGNED = "assigned"
    RESOLVED = "resolved"


class Resolution(enum.Enum):
    FRAUD = "fraud"
    LEGITIMATE = "legitimate"
    ROTATE = "rotate"
    DISMISS = "dismiss"


# A transaction case is decided by what the transaction was; a number watch case by what to do with the
# number.
RESOLUTIONS: dict[CaseKind, frozenset[Resolution]] = {
    CaseKind.TRANSACTION: frozenset({Resolution.FRAUD, Resolution.LEGITIMATE}),
    CaseKind.NUMBER_WATCH: frozenset({Resolution.ROTATE, Resolution.DISMISS}),
}
# The outcome label a transaction case's resolution records (as ReportOutcome would).
OUTCOMES: dict[Resolution, Outcome] = {
    Resolution.FRAUD: Outcome.FRAUD,
    Resolution.LEGITIMATE: Outcome.LEGITIMATE,
}


def new_case_id() -> str:
    """A case's public id: random, so ids say nothing about how many cases there are."""
    return secrets.token_hex(CASE_ID_LENGTH // 2)


def is_case_id(value: str) -> bool:
    return len(value) == CASE_ID_LENGTH and all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True, slots=True)
class Case:
    """A case as stored. ``number`` is the full watched number (number watch cases); show it masked."""

    case_id: str
    kind: CaseKind
    status: CaseStatus
    customer_id: str
    transaction_id: str
    number: str
    decision: Decision | None
    risk_score: float
    reasons: tuple[StoredReason, ...]
    opened_at: datetime
    assignee: str = ""
    assigned_at: datetime | None = None
    resolution: Resolution | None = None
    note: str = ""
    resolved_at: datetime | None = None
    resolved_by: str = ""


@dataclass(frozen=True, slots=True)
class CaseFilter:
    """ListCases' filters; None or "" matches everything."""

    status: CaseStatus | None = None
    kind: CaseKind | None = None
    assignee: str = ""
    reason: str = ""
    opened_after: datetime | None = None
    opened_before: datetime | None = None
