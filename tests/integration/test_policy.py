"""Lists and rules end to end: real servers, the real client, on SQLite and on PostgreSQL.

No model is trained here, so every transaction nothing else decides is the no-model REVIEW: a deny list or a
DECLINE rule shows as DECLINE, an allow list as APPROVE. Waiting for servers to pick up a change polls with a
bound, and asserts on what was answered, never on how long it took.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

import posguard
from posguard.v1 import common_pb2, customer_ids_pb2, policy_pb2, risk_pb2
from posguard_server.domain.api_keys import Role
from posguard_server.store.migrate import upgrade

from .conftest import run_cli

if TYPE_CHECKING:
    from pathlib import Path

    from click.testing import Result

    from .conftest import RunningServer

P = policy_pb2
V = customer_ids_pb2
REFRESH = 0.1  # seconds between a server's checks of the policy generation
PATIENCE = 60.0  # how long a poll waits for every server to see a change before the test fails


@pytest.fixture
def servers(server_factory: Callable[..., RunningServer], database_url: str) -> list[RunningServer]:
    """Two servers on one database (each backend), as replicas run."""
    upgrade(database_url)
    return [server_factory(database_url=database_url, model_refresh_seconds=REFRESH) for _ in range(2)]


@pytest.fixture
def admin(servers: list[RunningServer]) -> Iterator[posguard.Client]:
    with posguard.Client(servers[0].target, api_key=servers[0].key(Role.ADMIN), timeout=30) as client:
        yield client


def _transaction(
    number: str,
    *,
    terminal: str = "t-1",
    merchant: str = "m-1",
    amount: int = 1290,
    mcc: str = "5411",
    at: datetime | None = None,
) -> risk_pb2.Transaction:
    transaction = risk_pb2.Transaction(
        transaction_id="tx-" + uuid.uuid4().hex,
        customer_number=number,
        amount=common_pb2.Money(amount_minor=amount, currency="EUR"),
        merchant_id=merchant,
        terminal_id=terminal,
        mcc=mcc,
        channel=common_pb2.CHANNEL_POS,
    )
    transaction.event_time.FromDatetime(at or datetime.now(UTC))
    return transaction


def _codes(answer: risk_pb2.ScoreTransactionResponse) -> list[str]:
    return [reason.code for reason in answer.reasons]


def _until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never saw: {what}")
        time.sleep(REFRESH / 2)


def test_a_deny_listed_terminal_declines_on_every_server_and_stops_when_its_entry_expires(
    servers: list[RunningServer], admin: posguard.Client
) -> None:
    gateway_key = servers[0].key(Role.GATEWAY)
    number = admin.issue_customer_id().customer.primary.number
    created = admin.create_list(
        name="compromised-terminals",
        kind=P.LIST_KIND_TERMINAL,
        type=P.LIST_TYPE_DENY,
        description="terminals reported skimmed",
    )
    assert created.list.name == "compromised-terminals"
    admin.add_list_entry(list_name="compromised-terminals", value="t-bad", reason="skimmer found")
    clients = [posguard.Client(s.target, api_key=gateway_key, timeout=30) for s in servers]
    try:
        for client in clients:

            def declines(client: posguard.Client = client) -> bool:
                answer = client.score_transaction(transaction=_transaction(number, terminal="t-bad"))
                return answer.decision == risk_pb2.DECISION_DECLINE

            _until(declines, "the deny-listed terminal declined")
            answer = client.score_transaction(transaction=_transaction(number, terminal="t-bad"))
            assert answer.decision == risk_pb2.DECISION_DECLINE
            assert answer.reasons[0].code == "DENY_LISTED"
            assert "compromised-terminals" in answer.reasons[0].message
            assert "skimmer" not in answer.reasons[0].message  # the operator's note stays with operators
            other = client.score_transaction(transaction=_transaction(number, terminal="t-good"))
            assert other.decision == risk_pb2.DECISION_REVIEW
            assert "DENY_LISTED" not in _codes(other)

        # The entry replaced by one that expires shortly: once it has, no server declines any more.
        expires = datetime.now(UTC) + timedelta(seconds=1)
        entry = P.AddListEntryRequest(
            list_name="compromised-terminals", value="t-bad", reason="until replaced"
        )
        entry.expires_at.FromDatetime(expires)
        admin.add_list_entry(entry)
        _until(lambda: datetime.now(UTC) > expires, "the expiry passed")
        for client in clients:

            def approved_again(client: posguard.Client = client) -> bool:
                answer = client.score_transaction(transaction=_transaction(number, terminal="t-bad"))
                return answer.decision != risk_pb2.DECISION_DECLINE

            _until(approved_again, "the expired entry stop declining")
            answer = client.score_transaction(transaction=_transaction(number, terminal="t-bad"))
            assert "DENY_LISTED" not in _codes(answer)
    finally:
        for client in clients:
            client.close()
    listed = admin.list_entries(list_name="compromised-terminals")
    assert list(listed.entries) == []
    expired = admin.list_entries(list_name="compromised-terminals", include_expired=True)
    assert [e.value for e in expired.entries] == ["t-bad"]
    assert admin.list_lists().lists[0].entries == 0
    actions = [e.action for e in admin.list_audit_events(subject="compromised-terminals").events]
    assert actions == ["policy.list.created", "policy.list.entry_added", "policy.list.entry_added"]


def test_an_allow_list_waives_a_model_review_but_never_an_identity_decline(
    servers: list[RunningServer], admin: posguard.Client
) -> None:
    issued = admin.issue_customer_id().customer
    number, customer_id = issued.primary.number, issued.customer_id
    admin.create_list(name="vip", kind=P.LIST_KIND_CUSTOMER, type=P.LIST_TYPE_ALLOW)
    admin.add_list_entry(list_name="vip", value=customer_id, reason="board member")
    with posguard.Client(servers[1].target, api_key=servers[1].key(Role.GATEWAY), timeout=30) as gateway:

        def approved() -> bool:
            return gateway.score_transaction(transaction=_transaction(number)).decision == (
                risk_pb2.DECISION_APPROVE
            )

        _until(approved, "the allow list waive the review")
        answer = gateway.score_transaction(transaction=_transaction(number))
        assert _codes(answer)[:2] == ["ALLOW_LISTED", "NO_MODEL"]
        admin.suspend_customer_id(number=number, reason="card lost")
        suspended = gateway.score_transaction(transaction=_transaction(number))
        assert suspended.decision == risk_pb2.DECISION_DECLINE
        assert _codes(suspended) == ["NUMBER_SUSPENDED"]


def test_a_number_list_matches_however_the_number_is_written(
    servers: list[RunningServer], admin: posguard.Client
) -> None:
    number = admin.issue_customer_id().customer.primary.number
    spaced = " ".join(number[i : i + 4] for i in range(0, len(number), 4))
    admin.create_list(name="stolen", kind=P.LIST_KIND_NUMBER, type=P.LIST_TYPE_DENY)
    entry = admin.add_list_entry(list_name="stolen", value=spaced, reason="reported stolen").entry
    assert entry.value == number
    with posguard.Client(servers[0].target, api_key=servers[0].key(Role.GATEWAY), timeout=30) as gateway:
        _until(
            lambda: (
                gateway.score_transaction(transaction=_transaction(number)).decision
                == risk_pb2.DECISION_DECLINE
            ),
            "the deny-listed number declined",
        )
    assert admin.remove_list_entry(list_name="stolen", value=number, reason="found").removed
    assert not admin.remove_list_entry(list_name="stolen", value=number, reason="again").removed


def test_a_rule_that_does_not_compile_is_refused_with_the_position_of_the_error(
    admin: posguard.Client,
) -> None:
    with pytest.raises(posguard.InvalidArgumentError) as refused:
        admin.create_rule(
            name="BIG_NIGHT",
            condition="txn.amount > 500 &&\n  txn.hour < < 6",
            action=P.RULE_ACTION_DECLINE,
            reason="large payment at night",
        )
    error = refused.value
    assert error.reason == "RULE_DOES_NOT_COMPILE"
    assert [(v.field, v.description) for v in error.field_violations] == [
        ("condition", "line 2, column 14: unexpected '<'")
    ]
    with pytest.raises(posguard.InvalidArgumentError) as unknown:
        admin.create_rule(name="TYPO", condition="txn.amout > 5", action=P.RULE_ACTION_REVIEW, reason="typo")
    assert unknown.value.field_violations[0].description == "line 1, column 1: unknown variable 'txn.amout'"
    assert list(admin.list_rules().rules) == []  # nothing was stored


def test_a_rule_is_versioned_audited_and_named_in_the_reasons_of_the_answers_it_fires_on(
    servers: list[RunningServer], admin: posguard.Client
) -> None:
    number = admin.issue_customer_id().customer.primary.number
    draft = admin.create_rule(
        name="BIG_GAMBLING",
        condition='txn.amount >= 200 && txn.mcc in ["7995", "7801"]',
        action=P.RULE_ACTION_DECLINE,
        reason="a large payment to a gambling merchant",
    ).rule
    assert (draft.version, draft.status) == (1, P.RULE_STATUS_DRAFT)
    with posguard.Client(servers[1].target, api_key=servers[1].key(Role.GATEWAY), timeout=30) as gateway:
        big: dict[str, Any] = {"amount": 25_000, "mcc": "7995"}
        drafted = gateway.score_transaction(transaction=_transaction(number, **big))
        assert drafted.decision == risk_pb2.DECISION_REVIEW  # a draft decides nothing
        activated = admin.activate_rule(name="BIG_GAMBLING", reason="seen in the backtest")
        assert (activated.rule.status, activated.retired_version) == (P.RULE_STATUS_ACTIVE, 0)
        _until(
            lambda: (
                gateway.score_transaction(transaction=_transaction(number, **big)).decision
                == risk_pb2.DECISION_DECLINE
            ),
            "the active rule decline",
        )
        answer = gateway.score_transaction(transaction=_transaction(number, **big))
        fired = answer.reasons[0]
        assert (fired.code, fired.message) == ("BIG_GAMBLING", "a large payment to a gambling merchant")
        small = gateway.score_transaction(transaction=_transaction(number, amount=500, mcc="7995"))
        assert "BIG_GAMBLING" not in _codes(small)

        # Version 2 only adds its sentence; activating it retires version 1.
        admin.create_rule(
            name="BIG_GAMBLING",
            condition='txn.mcc in ["7995", "7801"]',
            action=P.RULE_ACTION_REASON,
            reason="a payment to a gambling merchant",
        )
        second = admin.activate_rule(name="BIG_GAMBLING", version=2, reason="softer")
        assert (second.rule.version, second.retired_version) == (2, 1)
        _until(
            lambda: (
                gateway.score_transaction(transaction=_transaction(number, **big)).decision
                == risk_pb2.DECISION_REVIEW
            ),
            "version 2 replace version 1",
        )
        answer = gateway.score_transaction(transaction=_transaction(number, **big))
        assert _codes(answer)[0] == "BIG_GAMBLING"
        admin.retire_rule(name="BIG_GAMBLING", reason="season over")
        _until(
            lambda: (
                "BIG_GAMBLING"
                not in _codes(gateway.score_transaction(transaction=_transaction(number, **big)))
            ),
            "the retired rule stop firing",
        )
    versions = [(r.version, r.status) for r in admin.list_rules(name="BIG_GAMBLING").rules]
    assert versions == [(2, P.RULE_STATUS_RETIRED), (1, P.RULE_STATUS_RETIRED)]
    with pytest.raises(posguard.FailedPreconditionError):
        admin.activate_rule(name="BIG_GAMBLING", version=1, reason="retired stays retired")
    events = admin.list_audit_events(subject="BIG_GAMBLING").events
    assert [e.action for e in events] == [
        "policy.rule.activated",
        "policy.rule.activated",
        "policy.rule.retired",
    ]
    created = [e.subject for e in admin.list_audit_events(action="policy.rule.created").events]
    assert created == ["BIG_GAMBLING@1", "BIG_GAMBLING@2"]


# -- what rules read in the scoring transaction -----------------------------------------------------------

SIGNAL_RULES = {
    "SEEN_FAILURES": "number.failed_verifications >= 1",
    "CODE_REPLAYED": "number.refused_codes >= 1",
    "JUST_ROTATED": "number.days_since_rotation < 1",
    "NEW_TERMINAL": "customer.new_terminal",
    "NEW_MERCHANT": "customer.new_merchant",
}


def test_rules_read_the_numbers_signals_and_place_novelty_from_the_database(
    servers: list[RunningServer], admin: posguard.Client
) -> None:
    """Each signal a rule can name is read in the scoring transaction, for the customer it belongs to."""
    plain = admin.issue_customer_id().customer.primary.number
    signalled = admin.issue_customer_id().customer.primary.number
    # A failed verification (a sub number used outside its scope), a replayed code, then a rotation.
    scoped = admin.issue_sub_id(primary_number=signalled, scope=V.SubScope(merchant_id="m-42")).sub_number
    assert not admin.verify_customer_id(number=scoped.number, merchant_id="m-1").valid
    enrolled = admin.enroll_dynamic_codes(number=signalled)
    code = posguard.dynamic_code(enrolled.secret)
    assert admin.redeem_dynamic_code(code=code, merchant_id="m-1").redeemed
    assert not admin.redeem_dynamic_code(code=code, merchant_id="m-1").redeemed
    rotated = admin.rotate_customer_id(number=signalled, reason="number leaked").customer.primary.number
    for name, condition in SIGNAL_RULES.items():
        admin.create_rule(name=name, condition=condition, action=P.RULE_ACTION_REVIEW, reason=name.lower())
        admin.activate_rule(name=name, reason="signals under test")
    with posguard.Client(servers[1].target, api_key=servers[1].key(Role.GATEWAY), timeout=30) as gateway:

        def fired(number: str, terminal: str, merchant: str) -> set[str]:
            answer = gateway.score_transaction(
                transaction=_transaction(number, terminal=terminal, merchant=merchant)
            )
            return set(_codes(answer)) & set(SIGNAL_RULES)

        probe = admin.issue_customer_id().customer.primary.number
        _until(lambda: "NEW_TERMINAL" in fired(probe, "t-probe", "m-probe"), "the rules in force")
        # The plain customer: each place is new once, and no number signal fires.
        assert fired(plain, "t-1", "m-1") == {"NEW_TERMINAL", "NEW_MERCHANT"}
        assert fired(plain, "t-1", "m-1") == set()
        assert fired(plain, "t-2", "m-1") == {"NEW_TERMINAL"}
        assert fired(plain, "t-2", "m-2") == {"NEW_MERCHANT"}
        # The signalled customer, paying with the number that replaced the rotated one.
        assert fired(rotated, "t-1", "m-1") == set(SIGNAL_RULES)
        assert fired(rotated, "t-1", "m-1") == {"SEEN_FAILURES", "CODE_REPLAYED", "JUST_ROTATED"}
        # One batch: the stream sends both customers together; each gets only its own signals.
        both = [_transaction(plain, terminal="t-3", merchant="m-2"), _transaction(rotated, terminal="t-1")]
        requests = [risk_pb2.ScoreTransactionsRequest(transaction=t) for t in both]
        answers = [r.result for r in gateway.score_transactions(iter(requests))]
        assert [set(_codes(a)) & set(SIGNAL_RULES) for a in answers] == [
            {"NEW_TERMINAL"},
            {"SEEN_FAILURES", "CODE_REPLAYED", "JUST_ROTATED"},
        ]


# -- backtest against live decisions ---------------------------------------------------------------------

RULE = (
    "txn.amount > 300 || customer.count_1h >= 2 || customer.spend_24h > 900"
    ' || (customer.new_terminal && txn.mcc == "5999")'
)
DAYS = 4
SHIFT = timedelta(days=10)  # the mirror customers pay the same way this much later


def _history(rng: random.Random, start: datetime) -> list[tuple[datetime, int, str, str]]:
    """A customer's payments over DAYS days: (time, amount minor, terminal, mcc), some bunched in an hour."""
    payments = []
    for day in range(DAYS):
        at = start + timedelta(days=day, hours=rng.randint(6, 20))
        for _ in range(rng.randint(2, 6)):
            at += timedelta(minutes=rng.choice([3, 12, 25, 70, 190]))
            amount = rng.choice([900, 4_500, 12_000, 28_000, 35_000, 60_000])
            payments.append((at, amount, f"t-{rng.randint(1, 4)}", rng.choice(["5411", "5999"])))
    return payments


def test_a_rules_decisions_equal_its_backtest_on_the_same_transactions(
    servers: list[RunningServer], admin: posguard.Client
) -> None:
    """Customers pay without the rule; mirror customers pay the very same way later, with it active."""
    rng = random.Random(18)
    start = (datetime.now(UTC) - timedelta(days=40)).replace(hour=0, minute=0, second=0, microsecond=0)
    rule = admin.create_rule(
        name="VELOCITY", condition=RULE, action=P.RULE_ACTION_DECLINE, reason="too much, too fast"
    ).rule
    customers = [_history(rng, start) for _ in range(3)]
    numbers = [admin.issue_customer_id().customer.primary.number for _ in customers]
    mirrors = [admin.issue_customer_id().customer.primary.number for _ in customers]
    with posguard.Client(servers[0].target, api_key=servers[0].key(Role.GATEWAY), timeout=30) as gateway:

        def pay(number: str, payments: list[tuple[datetime, int, str, str]], shift: timedelta) -> list[int]:
            return [
                gateway.score_transaction(
                    transaction=_transaction(number, terminal=terminal, amount=amount, mcc=mcc, at=at + shift)
                ).decision
                for at, amount, terminal, mcc in payments
            ]

        before = [
            pay(number, payments, timedelta()) for number, payments in zip(numbers, customers, strict=True)
        ]
        backtest = admin.backtest_rules(
            rules=[P.RuleRef(name="VELOCITY", version=rule.version)],
            start_time=_stamp(start),
            end_time=_stamp(start + timedelta(days=DAYS + 1)),
        )
        admin.activate_rule(name="VELOCITY", reason="backtested")
        time.sleep(REFRESH * 3)  # past one refresh: the mirrors are all scored with the rule in force
        probe = gateway.score_transaction(
            transaction=_transaction(admin.issue_customer_id().customer.primary.number, amount=99_000)
        )
        assert probe.decision == risk_pb2.DECISION_DECLINE, "the rule was not in force yet"
        after = [pay(number, payments, SHIFT) for number, payments in zip(mirrors, customers, strict=True)]

    hits: Counter[str] = Counter()
    changed: Counter[str] = Counter()
    for payments, was, now in zip(customers, before, after, strict=True):
        for (at, *_), old, new in zip(payments, was, now, strict=True):
            day = at.date().isoformat()
            hits[day] += new == risk_pb2.DECISION_DECLINE  # without a model, only the rule declines here
            changed[day] += new != old
    assert sum(hits.values()) > 0, "the rule must fire on some of the payments for the test to mean anything"
    assert sum(hits.values()) < sum(len(p) for p in customers), "and not on all of them"
    reported = {day.day: (day.hits, day.decisions_changed) for day in backtest.days}
    assert reported == {day: (hits[day], changed[day]) for day in hits}
    assert backtest.total.transactions == sum(len(p) for p in customers)
    assert backtest.total.hits == sum(hits.values())


def _stamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def test_backtest_counts_labelled_fraud_among_its_hits(
    servers: list[RunningServer], admin: posguard.Client
) -> None:
    number = admin.issue_customer_id().customer.primary.number
    start = (datetime.now(UTC) - timedelta(days=5)).replace(hour=0, minute=0, second=0, microsecond=0)
    ids = []
    with posguard.Client(servers[0].target, api_key=servers[0].key(Role.GATEWAY), timeout=30) as gateway:
        for i, amount in enumerate([1_000, 50_000, 70_000, 2_000]):
            transaction = _transaction(number, amount=amount, at=start + timedelta(hours=10 + i))
            gateway.score_transaction(transaction=transaction)
            ids.append(transaction.transaction_id)
    admin.report_outcome(transaction_id=ids[1], outcome=risk_pb2.OUTCOME_FRAUD)
    admin.report_outcome(transaction_id=ids[3], outcome=risk_pb2.OUTCOME_FRAUD)
    report = admin.backtest_rules(
        conditions=[P.CandidateRule(name="BIG", condition="txn.amount > 100", action=P.RULE_ACTION_DECLINE)],
        start_time=_stamp(start),
        end_time=_stamp(start + timedelta(days=1)),
    )
    day = report.days[0]
    assert (day.day, day.transactions, day.fraud, day.hits, day.fraud_hits) == (
        start.date().isoformat(),
        4,
        2,
        2,
        1,
    )
    assert (day.decisions_changed, day.declines, day.reviews) == (2, 2, 2)
    with pytest.raises(posguard.InvalidArgumentError) as refused:
        admin.backtest_rules(
            conditions=[P.CandidateRule(name="BAD", condition="txn.amount >", action=P.RULE_ACTION_DECLINE)],
            start_time=_stamp(start),
            end_time=_stamp(start + timedelta(days=1)),
        )
    assert refused.value.field_violations[0].field == "conditions[0].condition"


def test_the_commands_manage_lists_and_rules_and_refuse_a_rule_that_does_not_compile(
    servers: list[RunningServer], tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from posguard.cli import main

    env = {"POSGUARD_TARGET": servers[0].target, "POSGUARD_API_KEY": servers[0].key(Role.ADMIN)}

    def run(*args: str) -> Result:
        result = CliRunner().invoke(main, ["--json", *args], env=env)
        assert "Traceback" not in result.output
        return result

    assert run("lists", "create", "mccs", "--kind", "mcc", "--type", "deny").exit_code == 0
    assert (
        run("lists", "add", "mccs", "7995", "--reason", "no gambling", "--expires", "2099-01-01").exit_code
        == 0
    )
    listed = json.loads(run("lists", "entries", "mccs").stdout)
    assert [(e["value"], e["expires_at"]) for e in listed["entries"]] == [("7995", "2099-01-01T00:00:00Z")]
    assert run("lists", "remove", "mccs", "6051", "--reason", "not there").exit_code == 3
    refused = run(
        "rules", "create", "BAD", "--condition", "txn.amount >> 3", "--action", "decline", "--reason", "x"
    )
    assert refused.exit_code == 1
    report = json.loads(refused.stderr)
    assert report["reason"] == "RULE_DOES_NOT_COMPILE"
    assert report["field_violations"] == [
        {"field": "condition", "description": "line 1, column 13: unexpected '>'"}
    ]
    created = run(
        "rules", "create", "BIG", "--condition", "txn.amount > 100", "--action", "review", "--reason", "big"
    )
    assert json.loads(created.stdout)["rule"]["status"] == "RULE_STATUS_DRAFT"
    backtest = run("rules", "backtest", "--rule", "BIG@1", "--start", "2020-01-01", "--end", "2020-01-02")
    assert json.loads(backtest.stdout)["total"]["transactions"] == "0"

    # The operator's command backtests a rules file on the database directly.
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text('[[rule]]\nname = "BIG"\ncondition = "txn.amount > "\naction = "review"\n')
    server_cli = run_cli(
        "--database-url",
        servers[0].settings.effective_database_url,
        "rules",
        "backtest",
        "--rules-file",
        str(rules_file),
        "--start",
        "2020-01-01",
        "--end",
        "2020-01-02",
    )
    assert server_cli.returncode == 1
    assert "rule 1 (BIG): the condition does not compile: line 1, column 14" in server_cli.stderr
