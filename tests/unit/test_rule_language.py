"""The rule language compiles CEL-style conditions once, refuses bad ones with their position, and the policy
decides from lists and rules the way the issue says: deny declines, allow waives a model review only."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from posguard_server.domain.policy import (
    ListEntry,
    ListKind,
    ListType,
    Policy,
    PolicyInput,
    PolicyList,
    Rule,
    RuleAction,
    RuleStatus,
)
from posguard_server.domain.risk import Decision, Evaluation, ModelScope, StoredReason
from posguard_server.domain.rule_language import VARIABLES, RuleSyntaxError, compile_condition

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("condition", "facts", "fires"),
    [
        ("txn.amount > 500 && txn.mcc in ['7995', '6051']", {"txn.amount": 600, "txn.mcc": "7995"}, True),
        ("txn.amount > 500 && txn.mcc in ['7995', '6051']", {"txn.amount": 600, "txn.mcc": "5411"}, False),
        ("txn.amount > 500 && txn.mcc in ['7995', '6051']", {"txn.amount": 6, "txn.mcc": "7995"}, False),
        (
            "!customer.new_terminal || risk_score >= 0.5",
            {"customer.new_terminal": True, "risk_score": 0.7},
            True,
        ),
        (
            "!customer.new_terminal || risk_score >= 0.5",
            {"customer.new_terminal": True, "risk_score": 0.1},
            False,
        ),
        ("txn.amount > 5 * customer.spend_24h - 1", {"txn.amount": 50, "customer.spend_24h": 9}, True),
        ("-1 < -txn.amount", {"txn.amount": 0.5}, True),
        ('txn.channel == "online" && txn.hour < 6', {"txn.channel": "online", "txn.hour": 3}, True),
        ("1 + 1 == 2 && true", {}, True),
    ],
)
def test_conditions_evaluate_as_cel_would(condition: str, facts: dict[str, object], fires: bool) -> None:
    assert compile_condition(condition).condition(facts) is fires


@pytest.mark.parametrize(
    ("condition", "line", "column", "words"),
    [
        ("txn.amount > && 3", 1, 14, "unexpected '&&'"),
        ("txn.amount >\n  ", 2, 3, "ends too early"),
        ("txn.amout > 3", 1, 1, "unknown variable 'txn.amout'"),
        ('txn.amount > "3"', 1, 12, "compares a number with a string"),
        ("txn.amount + 3", 1, 1, "must be true or false"),
        ("txn.mcc in ['1', 2]", 1, 18, "in a list holding a number"),
        ("customer.new_terminal < true", 1, 23, "does not order"),
        ("txn.amount > 3 $", 1, 16, "unexpected character '$'"),
        ("txn.amount / 2 > 1", 1, 12, "unexpected character '/'"),
        ("size(txn.mcc) > 1", 1, 5, "unexpected '('"),
        ("", 1, 1, "empty"),
    ],
)
def test_a_condition_that_does_not_compile_names_the_position(
    condition: str, line: int, column: int, words: str
) -> None:
    with pytest.raises(RuleSyntaxError) as refused:
        compile_condition(condition)
    assert (refused.value.line, refused.value.column) == (line, column)
    assert words in refused.value.message


def test_deep_nesting_and_long_conditions_are_refused_not_crashed() -> None:
    assert compile_condition("(" * 500 + "true" + ")" * 500).condition({})  # parentheses build no nodes
    with pytest.raises(RuleSyntaxError) as deep:
        compile_condition("!" * 1900 + "true")
    assert "nested too deeply" in deep.value.message
    with pytest.raises(RuleSyntaxError):
        compile_condition("txn.amount > 1 && " * 200 + "true")


def test_every_variable_can_be_read() -> None:
    compiled = compile_condition(" && ".join(f"({name} == {name})" for name in VARIABLES))
    assert compiled.variables == frozenset(VARIABLES)


def _input(**changes: object) -> PolicyInput:
    values: dict[str, object] = {
        "customer_id": "c-1",
        "numbers": ("15600001",),
        "external_id": "",
        "merchant_id": "m-1",
        "terminal_id": "t-1",
        "mcc": "5411",
        "currency": "EUR",
        "channel": "pos",
        "amount": 50.0,
        "amount_minor": 5000,
        "time": 100_000.0,
        "hour": 12,
        "weekday": 3,
        "history": 10,
        "recent": [(100_000.0 - 300, 20.0), (100_000.0 - 1800, 30.0), (100_000.0 - 7200, 40.0)],
    }
    values.update(changes)
    return PolicyInput(**values)  # type: ignore[arg-type]


def _evaluation(decision: Decision) -> Evaluation:
    return Evaluation(
        risk_score=0.6,
        decision=decision,
        reasons=(StoredReason("AMOUNT_HIGH", "amount high", 0.5),),
        model_scope=ModelScope.GLOBAL,
        model_version="v1",
        history_size=10,
        cold_start=True,
        features=None,
        new_state=b"",
    )


def _rule(name: str, condition: str, action: RuleAction) -> Rule:
    return Rule(name, 1, condition, action, f"{name} fired", RuleStatus.ACTIVE, NOW, "test")


def _list(name: str, kind: ListKind, list_type: ListType, *values: str) -> tuple[PolicyList, list[ListEntry]]:
    return (
        PolicyList(name, kind, list_type, "", NOW, "test"),
        [ListEntry(name, value, "why", "test", NOW, None) for value in values],
    )


def _policy(*lists: tuple[PolicyList, list[ListEntry]], rules: tuple[Rule, ...] = ()) -> Policy:
    return Policy.build(1, [plist for plist, _ in lists], [e for _, entries in lists for e in entries], rules)


def test_counters_cover_their_windows() -> None:
    policy = _policy(
        rules=(
            _rule("C10", "customer.count_10m == 1 && customer.spend_10m == 20", RuleAction.REASON),
            _rule("C1H", "customer.count_1h == 2 && customer.spend_1h == 50", RuleAction.REASON),
            _rule("C24", "customer.count_24h == 3 && customer.spend_24h == 90", RuleAction.REASON),
        )
    )
    verdict = policy.verdict(_input(), 0.1, Decision.APPROVE, now=0)
    assert verdict is not None
    assert verdict.rules_fired == ("C10", "C1H", "C24")
    assert verdict.decision is Decision.APPROVE  # REASON rules decide nothing


def test_deny_declines_allow_waives_only_a_review_and_rules_are_reasons() -> None:
    deny = _list("bad-terminals", ListKind.TERMINAL, ListType.DENY, "t-1")
    allow = _list("vip", ListKind.CUSTOMER, ListType.ALLOW, "c-1")
    review_rule = _rule("NIGHT", "txn.hour == 12", RuleAction.REVIEW)

    waived = _policy(allow).apply(_input(), _evaluation(Decision.REVIEW), now=0)
    assert waived.decision is Decision.APPROVE
    assert [r.code for r in waived.reasons] == ["ALLOW_LISTED", "AMOUNT_HIGH"]
    kept = _policy(allow).apply(_input(), _evaluation(Decision.DECLINE), now=0)
    assert kept.decision is Decision.DECLINE  # a model decline is not waived
    both = _policy(allow, deny).apply(_input(), _evaluation(Decision.REVIEW), now=0)
    assert both.decision is Decision.DECLINE  # deny wins over allow
    assert both.reasons[0].code == "DENY_LISTED"
    assert "bad-terminals" in both.reasons[0].message
    ruled = _policy(allow, rules=(review_rule,)).apply(_input(), _evaluation(Decision.REVIEW), now=0)
    assert ruled.decision is Decision.REVIEW  # an allow list never waives a rule's review
    assert [r.code for r in ruled.reasons][:2] == ["NIGHT", "ALLOW_LISTED"]
    assert ruled.reasons[0].message == "NIGHT fired"
    assert _policy(deny).apply(None, _evaluation(Decision.DECLINE), now=0).reasons[0].code == "AMOUNT_HIGH"


def test_an_expired_entry_stops_matching() -> None:
    plist, _ = _list("bad", ListKind.MERCHANT, ListType.DENY)
    entry = ListEntry("bad", "m-1", "why", "test", NOW, datetime(2026, 1, 2, tzinfo=UTC))
    policy = Policy.build(1, [plist], [entry], ())
    expiry = entry.expires_at.timestamp() if entry.expires_at else 0
    assert policy.verdict(_input(), 0.0, Decision.APPROVE, now=expiry - 1) is not None
    assert policy.verdict(_input(), 0.0, Decision.APPROVE, now=expiry) is None
