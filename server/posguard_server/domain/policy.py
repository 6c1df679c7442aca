"""Lists and rules: what operators decide beside the models, and how it changes an answer.

A **list** holds values of one kind (customers, numbers, external ids, merchants, terminals, MCCs), each
entry with a reason, an author and an optional expiry. A deny list declines a transaction that names one of
its values, with a reason naming the list; an allow list waives a review the model asked for (never an
identity decline: a revoked number, a replayed code, which are decided before any list is read, nor a deny
list's or a rule's decision).

A **rule** is a named condition in the rule language (``rule_language``) with an action: DECLINE, REVIEW or
REASON (add its sentence to the answer, decide nothing). Rules are versioned: each change is a new DRAFT
version; activating a version retires the one active before it; at most one version of a name is active.

``Policy`` is what a server holds in memory: the unexpired entries of every list and the active rules,
compiled. ``Policy.apply`` turns the model's evaluation into the answer. It is the one place lists and rules
decide, used by live scoring and by the backtest alike, so both decide the same way.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final

from posguard_server.domain.risk import Decision, Evaluation, StoredReason
from posguard_server.domain.rule_language import Compiled, compile_condition

# Names of lists and rules: a rule's name is the code of its reason in answers.
NAME_PATTERN: Final = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
LIST_NAME_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
VALUE_MAX: Final = 128
REASON_MAX: Final = 500
# The reason codes lists put on answers.
DENY_LISTED: Final = "DENY_LISTED"
ALLOW_LISTED: Final = "ALLOW_LISTED"
# The counters' windows (seconds).
WINDOWS: Final[Mapping[str, float]] = {"10m": 600.0, "1h": 3600.0, "24h": 86400.0}
NEVER_ROTATED_DAYS: Final = 100_000.0


class ListKind(enum.Enum):
    CUSTOMER = "customer"
    NUMBER = "number"
    EXTERNAL_ID = "external_id"
    MERCHANT = "merchant"
    TERMINAL = "terminal"
    MCC = "mcc"


class ListType(enum.Enum):
    DENY = "deny"
    ALLOW = "allow"


class RuleStatus(enum.Enum):
    DRAFT = "DRAFT"
    ACTIVE = "ACTIVE"
    RETIRED = "RETIRED"


class RuleAction(enum.Enum):
    DECLINE = "DECLINE"
    REVIEW = "REVIEW"
    REASON = "REASON"


@dataclass(frozen=True, slots=True)
class PolicyList:
    name: str
    kind: ListKind
    type: ListType
    description: str
    created_at: datetime
    created_by: str
    entries: int = 0  # unexpired entries, where counted


@dataclass(frozen=True, slots=True)
class ListEntry:
    list_name: str
    value: str
    reason: str
    author: str
    created_at: datetime
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    version: int
    condition: str
    action: RuleAction
    reason: str  # the sentence the answer carries when the rule fires
    status: RuleStatus
    created_at: datetime
    created_by: str
    activated_at: datetime | None = None
    retired_at: datetime | None = None


def normalize_value(kind: ListKind, value: str) -> str:
    """A list value as matched: numbers without spaces or hyphens, MCCs and ids as given, trimmed."""
    value = value.strip()
    if kind is ListKind.NUMBER:
        value = value.replace(" ", "").replace("-", "").upper()
    return value


# -- the facts a rule reads ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NumberSignals:
    """What the customer's numbers say: read for rules that name ``number.*`` variables only."""

    failed_verifications: int = 0
    refused_codes: int = 0
    days_since_rotation: float = NEVER_ROTATED_DAYS


@dataclass(slots=True)
class PolicyInput:
    """What lists and rules look at for one transaction, before the model's score is known.

    ``recent`` are ``(epoch seconds, amount)`` of the customer's earlier transactions of the last 24 hours
    (the profile keeps them). ``new_merchant`` and ``new_terminal`` are None when no rule asked for them.
    """

    customer_id: str
    numbers: tuple[str, ...]  # the number presented and the customer's primary number (canonical)
    external_id: str  # "namespace:value" when the transaction named one, else ""
    merchant_id: str
    terminal_id: str
    mcc: str
    currency: str
    channel: str
    amount: float
    amount_minor: int
    time: float  # epoch seconds of the event
    hour: int
    weekday: int
    history: int
    typical_amount: float = 0.0
    recent: Sequence[tuple[float, float]] = ()
    new_merchant: bool | None = None
    new_terminal: bool | None = None
    signals: NumberSignals | None = None


def _windows(i: PolicyInput) -> dict[str, float]:
    """Every ``customer.count_*`` and ``customer.spend_*`` in one pass over ``recent``.

    Rule sets usually read several windows; one pass walks the customer's last 24 hours once for all of them
    (``Facts`` keeps the six values), where a pass per variable walked it up to six times per transaction.
    """
    spent: dict[str, list[float]] = {name: [] for name in WINDOWS}
    starts = [(i.time - seconds, spent[name]) for name, seconds in WINDOWS.items()]
    for at, amount in i.recent:
        if at <= i.time:
            for start, amounts in starts:
                if at >= start:
                    amounts.append(amount)
    found: dict[str, float] = {}
    for name, amounts in spent.items():
        found[f"customer.count_{name}"] = len(amounts)
        found[f"customer.spend_{name}"] = math.fsum(amounts)
    return found


def _window(key: str) -> Callable[[PolicyInput], float]:
    return lambda i: _windows(i)[key]


_WINDOW_VARIABLES: Final = frozenset(
    f"customer.{measure}_{name}" for measure in ("count", "spend") for name in WINDOWS
)


def _signals(i: PolicyInput) -> NumberSignals:
    return i.signals if i.signals is not None else NumberSignals()


_LAZY: Final[Mapping[str, Callable[[PolicyInput], Any]]] = {
    "txn.amount": lambda i: i.amount,
    "txn.amount_minor": lambda i: i.amount_minor,
    "txn.currency": lambda i: i.currency,
    "txn.channel": lambda i: i.channel,
    "txn.mcc": lambda i: i.mcc,
    "txn.merchant_id": lambda i: i.merchant_id,
    "txn.terminal_id": lambda i: i.terminal_id,
    "txn.hour": lambda i: i.hour,
    "txn.weekday": lambda i: i.weekday,
    "customer.history": lambda i: i.history,
    "customer.typical_amount": lambda i: i.typical_amount,
    **{key: _window(key) for key in sorted(_WINDOW_VARIABLES)},
    "customer.new_merchant": lambda i: bool(i.new_merchant),
    "customer.new_terminal": lambda i: bool(i.new_terminal),
    "number.failed_verifications": lambda i: _signals(i).failed_verifications,
    "number.refused_codes": lambda i: _signals(i).refused_codes,
    "number.days_since_rotation": lambda i: _signals(i).days_since_rotation,
}


class Facts(dict[str, Any]):
    """The variables of one transaction, each computed the first time a rule reads it."""

    __slots__ = ("_input",)

    def __init__(self, policy_input: PolicyInput, risk_score: float, decision: Decision) -> None:
        super().__init__({"risk_score": risk_score, "model.decision": decision.value})
        self._input = policy_input

    def __missing__(self, key: str) -> Any:
        if key in _WINDOW_VARIABLES:
            self.update(_windows(self._input))
            return self[key]
        value = _LAZY[key](self._input)
        self[key] = value
        return value


# -- compiled rules and the policy -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompiledRule:
    rule: Rule
    compiled: Compiled

    @classmethod
    def of(cls, rule: Rule) -> CompiledRule:
        return cls(rule, compile_condition(rule.condition))


@dataclass(frozen=True, slots=True)
class Hit:
    """A list entry a transaction matched."""

    list_name: str
    kind: ListKind
    type: ListType
    expires_at: float | None  # epoch seconds


_SEVERITY: Final[Mapping[Decision, int]] = {Decision.APPROVE: 0, Decision.REVIEW: 1, Decision.DECLINE: 2}
_KIND_WORDS: Final[Mapping[ListKind, str]] = {
    ListKind.CUSTOMER: "customer",
    ListKind.NUMBER: "customer number",
    ListKind.EXTERNAL_ID: "external id",
    ListKind.MERCHANT: "merchant",
    ListKind.TERMINAL: "terminal",
    ListKind.MCC: "merchant category",
}


@dataclass(frozen=True, slots=True)
class Verdict:
    """What lists and rules made of one transaction: the decision and the reasons they add."""

    decision: Decision
    reasons: tuple[StoredReason, ...]
    rules_fired: tuple[str, ...]
    listed: tuple[str, ...]  # the names of the lists that matched

    @property
    def hit(self) -> bool:
        return bool(self.rules_fired or self.listed)


@dataclass(slots=True)
class Policy:
    """The lists' unexpired entries and the active rules, compiled; immutable once built."""

    generation: int = 0
    # kind → value → the lists holding it
    entries: dict[ListKind, dict[str, list[Hit]]] = field(default_factory=dict)
    rules: tuple[CompiledRule, ...] = ()
    needs: frozenset[str] = frozenset()  # every variable an active rule reads

    @classmethod
    def build(
        cls, generation: int, lists: Iterable[PolicyList], entries: Iterable[ListEntry], rules: Iterable[Rule]
    ) -> Policy:
        by_name = {plist.name: plist for plist in lists}
        table: dict[ListKind, dict[str, list[Hit]]] = {}
        for entry in entries:
            plist = by_name.get(entry.list_name)
            if plist is None:
                continue
            expires = entry.expires_at.timestamp() if entry.expires_at is not None else None
            table.setdefault(plist.kind, {}).setdefault(entry.value, []).append(
                Hit(plist.name, plist.kind, plist.type, expires)
            )
        compiled = tuple(CompiledRule.of(rule) for rule in sorted(rules, key=lambda r: r.name))
        needs = frozenset(name for rule in compiled for name in rule.compiled.variables)
        return cls(generation, table, compiled, needs)

    @property
    def empty(self) -> bool:
        return not self.entries and not self.rules

    def hits(self, policy_input: PolicyInput, now: float) -> list[Hit]:
        """The unexpired list entries the transaction names."""
        if not self.entries:
            return []
        found: list[Hit] = []
        for kind, values in _values(policy_input):
            table = self.entries.get(kind)
            if not table:
                continue
            for value in values:
                for hit in table.get(value, ()):
                    if hit.expires_at is None or hit.expires_at > now:
                        found.append(hit)
        return found

    def verdict(
        self, policy_input: PolicyInput, risk_score: float, decision: Decision, *, now: float
    ) -> Verdict | None:
        """What the lists and rules decide on top of the model's ``decision``; None when nothing matched."""
        hits = self.hits(policy_input, now)
        fired: list[CompiledRule] = []
        if self.rules:
            facts = Facts(policy_input, risk_score, decision)
            fired = [rule for rule in self.rules if rule.compiled.condition(facts)]
        if not hits and not fired:
            return None
        reasons: list[StoredReason] = []
        final = decision
        denied = sorted({(h.list_name, h.kind) for h in hits if h.type is ListType.DENY}, key=lambda x: x[0])
        allowed = sorted({h.list_name for h in hits if h.type is ListType.ALLOW})
        if allowed and decision is Decision.REVIEW:
            # The model's review (or the no-model review) is waived; deny lists and rules below still decide.
            final = Decision.APPROVE
            reasons.append(
                StoredReason(
                    ALLOW_LISTED,
                    f"on allow list {', '.join(allowed)}: the model's review is waived",
                    1.0,
                )
            )
        for name, kind in denied:
            final = Decision.DECLINE
            reasons.insert(0, StoredReason(DENY_LISTED, f"{_KIND_WORDS[kind]} is on deny list {name}", 1.0))
        for compiled in fired:
            rule = compiled.rule
            if rule.action is RuleAction.DECLINE:
                final = Decision.DECLINE
            elif rule.action is RuleAction.REVIEW and _SEVERITY[final] < _SEVERITY[Decision.REVIEW]:
                final = Decision.REVIEW
        rule_reasons = [StoredReason(c.rule.name, c.rule.reason, 1.0) for c in fired]
        deny_count = len(denied)
        reasons[deny_count:deny_count] = rule_reasons
        return Verdict(
            final,
            tuple(reasons),
            tuple(c.rule.name for c in fired),
            tuple(sorted({h.list_name for h in hits})),
        )

    def apply(self, policy_input: PolicyInput | None, evaluation: Evaluation, *, now: float) -> Evaluation:
        """The answer: the model's evaluation and what lists and rules decide; identity declines untouched."""
        if policy_input is None or self.empty:
            return evaluation
        verdict = self.verdict(policy_input, evaluation.risk_score, evaluation.decision, now=now)
        if verdict is None:
            return evaluation
        return replace(evaluation, decision=verdict.decision, reasons=verdict.reasons + evaluation.reasons)


def _values(policy_input: PolicyInput) -> list[tuple[ListKind, Sequence[str]]]:
    i = policy_input
    return [
        (ListKind.CUSTOMER, (i.customer_id,)),
        (ListKind.NUMBER, i.numbers),
        (ListKind.EXTERNAL_ID, (i.external_id,) if i.external_id else ()),
        (ListKind.MERCHANT, (i.merchant_id,) if i.merchant_id else ()),
        (ListKind.TERMINAL, (i.terminal_id,) if i.terminal_id else ()),
        (ListKind.MCC, (i.mcc,) if i.mcc else ()),
    ]
