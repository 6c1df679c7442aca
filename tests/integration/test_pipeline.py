"""The data path end to end: import, train, hot swap into a running server, evaluate."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import posguard
from posguard.v1 import common_pb2, risk_pb2

if TYPE_CHECKING:
    from collections.abc import Callable

    from .conftest import Cli, RunningServer

SAMPLE = Path(__file__).parents[1] / "data" / "handbook_sample.csv.gz"
TRAIN = ("train", "--customer-min-history", "30", "--customer-estimators", "10", "--n-estimators", "30")


def _version(output: str) -> str:
    match = re.search(r"version (\S+) \(active\)", output)
    assert match, output
    return match.group(1)


def _big_payment(transaction_id: str, hour: int) -> risk_pb2.Transaction:
    """5,000 EUR: far beyond anything this customer (or anyone in the sample) spends."""
    txn = risk_pb2.Transaction(
        transaction_id=transaction_id,
        external_id=common_pb2.ExternalId(namespace="source", value="HB001545"),
        amount=common_pb2.Money(amount_minor=5_000_00, currency="EUR"),
        merchant_id="T001694",
        terminal_id="T001694",
    )
    txn.event_time.FromDatetime(datetime(2018, 8, 1, hour, tzinfo=UTC))
    return txn


def test_import_is_idempotent_and_a_trained_model_reaches_a_running_server(
    cli: Cli, tmp_path: Path, server_factory: Callable[..., RunningServer]
) -> None:
    data = ("--data-dir", str(tmp_path / "data"))
    first = cli(*data, "import", "transactions", str(SAMPLE), timeout=120)
    assert first.returncode == 0, first.stderr
    assert re.search(r"7721 rows read, 7721 new, 0 already stored; 30 customers created", first.stdout)
    again = cli(*data, "import", "transactions", str(SAMPLE), timeout=120)
    assert "7721 rows read, 0 new, 7721 already stored; 0 customers created" in again.stdout, again.stdout
    outcomes = cli(*data, "import", "outcomes", str(SAMPLE))
    assert "217 outcomes read, 217 matched" in outcomes.stdout, outcomes.stderr

    trained = cli(*data, *TRAIN, timeout=120)
    assert trained.returncode == 0, trained.stderr
    assert "217 labelled fraud left out" in trained.stdout
    version = _version(trained.stdout)

    server = server_factory()
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:

        def score(transaction_id: str) -> risk_pb2.ScoreTransactionResponse:
            return client.score_transaction(transaction=_big_payment(transaction_id, 12))

        answer = score("new-1")
        assert answer.model.version == version
        assert answer.model.scope in (risk_pb2.MODEL_SCOPE_CUSTOMER, risk_pb2.MODEL_SCOPE_GLOBAL)
        assert answer.model.history_size > 30
        assert answer.risk_score > 0.99
        assert answer.decision != risk_pb2.DECISION_APPROVE
        assert {r.code for r in answer.reasons} & {"AMOUNT_ABOVE_USUAL", "LARGE_AMOUNT"}
        assert all(r.message and "EUR" in r.message for r in answer.reasons if r.code == "LARGE_AMOUNT")

        retrained = cli(*data, *TRAIN, "--seed", "1", timeout=120)
        new_version = _version(retrained.stdout)
        assert new_version != version
        deadline = time.monotonic() + 20
        seen = answer.model.version
        attempt = 0
        while seen != new_version and time.monotonic() < deadline:
            attempt += 1
            seen = score(f"new-2-{attempt}").model.version
            time.sleep(0.5)
        assert seen == new_version, "the promoted model did not reach the running server"

    # The decision thresholds are settings: the same risk approves or declines.
    for overrides, decision in (
        ({"risk_review_threshold": 1.0, "risk_decline_threshold": 1.0}, risk_pb2.DECISION_APPROVE),
        ({"risk_review_threshold": 0.3, "risk_decline_threshold": 0.5}, risk_pb2.DECISION_DECLINE),
    ):
        other = server_factory(**overrides)
        with posguard.Client(other.target, api_key=other.key("gateway")) as client:
            answer = client.score_transaction(transaction=_big_payment(f"new-3-{decision}", 13))
            assert answer.risk_score > 0.99
            assert answer.decision == decision


def _evaluated(cli: Cli, *flags: str) -> dict[str, Any]:
    result = cli("evaluate", str(SAMPLE), "--seeds", "0", "--json", *flags, *TRAIN[1:], timeout=280)
    assert result.returncode == 0, result.stderr
    *seed_lines, last = result.stdout.splitlines()  # a line per seed as it finishes, then the report
    report: dict[str, Any] = json.loads(last)
    assert [json.loads(line)["seed_result"] for line in seed_lines] == report["seeds"]
    for seed in report["seeds"]:
        del seed["seconds"]  # the stages differ: import and replay, or prepare and score
    return report


@pytest.fixture(scope="module")
def through_server() -> dict[str, dict[str, Any]]:
    """Reports of ``evaluate --through-server``, by labels flag, made once for the tests that read them."""
    return {}


def _through_server(cli: Cli, labels: str, reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if labels not in reports:
        reports[labels] = _evaluated(cli, labels, "--through-server")
    return reports[labels]


@pytest.mark.parametrize("labels", ["--labels", "--no-labels"])
def test_evaluate_computed_directly_answers_as_the_service_does(
    cli: Cli, labels: str, through_server: dict[str, dict[str, Any]]
) -> None:
    # Every number, to the last bit: detection overall and per scenario, refusals, reports, training metrics.
    assert _evaluated(cli, labels, "--jobs", "2") == _through_server(cli, labels, through_server)


def test_evaluate_runs_the_protocol_through_the_service(
    cli: Cli, through_server: dict[str, dict[str, Any]]
) -> None:
    report = _through_server(cli, "--labels", through_server)
    seed = report["seeds"][0]
    assert report["split"] == {"days": 120, "history_days": 72, "test_start_day": 84}
    assert seed["refused"] == 0
    assert seed["outcomes_reported"] > 0
    # Far above a random ranking (AP = fraud rate) on the unseen test days.
    assert seed["ap"] > 5 * seed["frauds"] / seed["transactions"]
    assert set(seed["scenarios"]) <= {"1", "2", "3"}


def test_evaluate_reports_what_a_rules_file_does_on_the_test_days(cli: Cli, tmp_path: Path) -> None:
    """A rule over the transaction alone hits exactly the test-day rows it names, on top of the decisions
    the configured thresholds give (here: every payment declined by the model, so the rule changes none)."""
    from posguard_server.pipeline.evaluate import Split, load_rows

    rules = tmp_path / "rules.toml"
    rules.write_text(
        '[[rule]]\nname = "BIG_AMOUNT"\ncondition = "txn.amount > 220"\naction = "decline"\n',
        encoding="utf-8",
    )
    declining = {"POSGUARD_RISK_REVIEW_THRESHOLD": "0.000001", "POSGUARD_RISK_DECLINE_THRESHOLD": "0.000001"}
    arguments = ("evaluate", str(SAMPLE), "--seeds", "0", "--json", "--rules-file", str(rules))
    result = cli(*arguments, env=declining, timeout=280)
    assert result.returncode == 0, result.stderr
    effect = json.loads(result.stdout.splitlines()[-1])["seeds"][0]["rules"]
    rows = load_rows(SAMPLE)
    start = rows[0].transaction.event_time.date()
    days = [(r.transaction.event_time.date() - start).days for r in rows]
    split = Split.of(days[-1] + 1)
    test = [r for r, d in zip(rows, days, strict=True) if d >= split.test_start]
    big = [r for r in test if r.transaction.amount_minor > 220_00]
    assert effect["transactions"] == len(test)
    assert effect["fraud"] == sum(bool(r.is_fraud) for r in test)
    assert effect["hits"] == len(big) > 0
    assert effect["fraud_hits"] == sum(bool(r.is_fraud) for r in big)
    assert effect["declines"] == len(test)
    assert effect["decisions_changed"] == 0
