"""The ``posguard`` command line as scripts see it: exit statuses, replayed scores, bounds, required options,
empty and paged lists, the missing-key hint, and the model commands' words; against a real server."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text

import posguard
from posguard.cli import main
from posguard.v1 import risk_pb2
from posguard_models.training import TrainingConfig, train
from posguard_server.issuers import build_numbering
from posguard_server.pipeline.importer import Importer, read_transactions
from posguard_server.pipeline.trainer import load_history, register
from posguard_server.store.customers import SqlCustomer
from posguard_server.store.history import SqlHistoryStore
from posguard_server.store.model_registry import SqlModelRegistry

from .test_admin_models import _register as register_models
from .test_client_cli import _CLIENT_VARIABLES, run

if TYPE_CHECKING:
    from .conftest import RunningServer

SAMPLE = Path(__file__).parents[1] / "data" / "handbook_sample.csv.gz"
T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
WHEN = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0).isoformat()


def _issue(server: RunningServer) -> str:
    issued = run(server, "--json", "issue", key=server.key("gateway"))
    assert issued.exit_code == 0, issued.output
    number: str = json.loads(issued.stdout)["customer"]["primary"]["number"]
    return number


def _score_args(transaction_id: str, *payer: str, amount: str = "1250") -> list[str]:
    return [
        "score",
        "--transaction-id",
        transaction_id,
        *payer,
        "--amount-minor",
        amount,
        "--currency",
        "CNY",
        "--merchant-id",
        "m-1",
        "--time",
        WHEN,
    ]


# -- exit statuses -------------------------------------------------------------------------------------------


def test_a_number_that_does_not_verify_is_answered_then_exits_3(server: RunningServer) -> None:
    gateway = server.key("gateway")
    text_answer = run(server, "verify", "1234", key=gateway)
    assert text_answer.exit_code == 3, text_answer.output
    assert "valid: false" in text_answer.stdout
    assert "reason: VERIFICATION_REASON_MALFORMED" in text_answer.stdout
    assert text_answer.stderr == ""

    json_answer = run(server, "--json", "verify", "1234", key=gateway)
    assert json_answer.exit_code == 3
    answer = json.loads(json_answer.stdout)
    assert (answer["valid"], answer["reason"]) == (False, "VERIFICATION_REASON_MALFORMED")

    valid = run(server, "verify", _issue(server), key=gateway)
    assert valid.exit_code == 0, valid.output
    assert "valid: true" in valid.stdout


def test_a_refused_redemption_is_answered_then_exits_3(server: RunningServer) -> None:
    gateway = server.key("gateway")
    number = _issue(server)
    assert run(server, "enroll", number, key=gateway).exit_code == 0
    code = json.loads(run(server, "--json", "code", number, key=gateway).stdout)["code"]

    first = run(server, "redeem", code, "--merchant-id", "m-1", key=gateway)
    assert first.exit_code == 0, first.output
    assert "redeemed: true" in first.stdout

    again = run(server, "--json", "redeem", code, "--merchant-id", "m-1", key=gateway)
    assert again.exit_code == 3, again.output
    answer = json.loads(again.stdout)
    assert (answer["redeemed"], answer["reason"]) == (False, "REDEMPTION_REASON_ALREADY_USED")


def test_score_exits_0_for_approve_and_3_for_decline(server_factory: Callable[..., RunningServer]) -> None:
    # No model is active: the answer is the no-model decision, here set to approve.
    server = server_factory(risk_no_model_decision="approve")
    gateway = server.key("gateway")
    number = _issue(server)
    approved = run(server, "--json", *_score_args("tx-approve", "--number", number), key=gateway)
    assert approved.exit_code == 0, approved.output
    assert json.loads(approved.stdout)["decision"] == "DECISION_APPROVE"

    assert run(server, "revoke", number, "--reason", "card lost", key=server.key("admin")).exit_code == 0
    declined = run(server, *_score_args("tx-decline", "--number", number), key=gateway)
    assert declined.exit_code == 3, declined.output
    assert "decision: DECISION_DECLINE" in declined.stdout
    assert "NUMBER_REVOKED" in declined.stdout


def test_score_held_for_review_exits_4(server_factory: Callable[..., RunningServer]) -> None:
    # Any model score is REVIEW between these thresholds: calibrated scores stay below 1.
    running = server_factory(risk_review_threshold=0.5, risk_decline_threshold=1.0, model_refresh_seconds=0.2)
    database = running.server.database
    Importer.on(database, build_numbering(running.settings)).import_rows(read_transactions(SAMPLE))
    small = {"n_estimators": 20, "customer_estimators": 5, "customer_min_history": 30}
    trained = train(load_history(SqlHistoryStore(database)), TrainingConfig(seed=0, **small))
    register(SqlModelRegistry(database), trained, version="run-1", activate=True, actor="t")

    def big(transaction_id: str) -> list[str]:
        # 5,000 EUR: far beyond anything this customer (or anyone in the sample) spends.
        return [
            "--json",
            "score",
            "--transaction-id",
            transaction_id,
            "--external",
            "source:HB001545",
            "--amount-minor",
            "500000",
            "--currency",
            "EUR",
            "--merchant-id",
            "T001694",
            "--time",
            "2018-08-01T12:00:00Z",
        ]

    gateway = running.key("gateway")
    deadline = time.monotonic() + 10
    attempt = 0
    while True:  # the server picks up the model on its next registry check
        attempt += 1
        result = run(running, *big(f"big-{attempt}"), key=gateway)
        answer = json.loads(result.stdout)
        if answer["model"]["version"] == "run-1" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert answer["model"]["version"] == "run-1"
    assert answer["decision"] == "DECISION_REVIEW"
    assert result.exit_code == 4, result.output


def test_audit_verify_exits_3_on_a_break_and_prints_where(server: RunningServer) -> None:
    admin = server.key("admin")
    for i in range(3):
        created = run(server, "keys", "create", "--role", "gateway", "--name", f"till {i}", key=admin)
        assert created.exit_code == 0
    intact = run(server, "audit", "verify", key=admin)
    assert intact.exit_code == 0, intact.output
    assert "intact: true" in intact.stdout

    with server.server.database.engine.begin() as connection:
        connection.execute(text("UPDATE audit_events SET actor = 'cli' WHERE sequence = 2"))
    broken = run(server, "--json", "audit", "verify", key=admin)
    assert broken.exit_code == 3, broken.output
    report = json.loads(broken.stdout)
    assert (report["intact"], report["first_bad_sequence"], report["problem"]) == (
        False,
        "2",  # int64 is a string in proto JSON
        "AUDIT_PROBLEM_EDITED",
    )


# -- re-running score ----------------------------------------------------------------------------------------


def test_running_the_same_score_again_replays_the_first_answer(server: RunningServer) -> None:
    gateway = server.key("gateway")
    args = ["--json", *_score_args("tx-again", "--number", _issue(server))]
    # No model is active: REVIEW (exit 4), the default no-model decision.
    first = run(server, *args, key=gateway)
    assert first.exit_code == 4, first.output
    second = run(server, *args, key=gateway)
    assert second.exit_code == 4, second.output
    one, two = json.loads(first.stdout), json.loads(second.stdout)
    assert (one["replayed"], two["replayed"]) == (False, True)
    assert {**one, "replayed": True} == two

    # The same id for another transaction is still refused: replaying is not a blind cache.
    changed = [*args[:-1], (datetime.fromisoformat(WHEN) + timedelta(minutes=1)).isoformat()]
    conflict = run(server, *changed, key=gateway)
    assert conflict.exit_code == 1
    assert json.loads(conflict.stderr)["reason"] == "IDEMPOTENCY_CONFLICT"


def test_running_the_same_score_with_a_dynamic_code_again_replays_without_using_the_code(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory(risk_no_model_decision="approve")
    gateway = server.key("gateway")
    number = _issue(server)
    assert run(server, "enroll", number, key=gateway).exit_code == 0
    code = json.loads(run(server, "--json", "code", number, key=gateway).stdout)["code"]
    args = ["--json", *_score_args("tx-code", "--code", code)]
    first, second = run(server, *args, key=gateway), run(server, *args, key=gateway)
    assert (first.exit_code, second.exit_code) == (0, 0), second.output
    assert json.loads(first.stdout)["decision"] == "DECISION_APPROVE"
    assert json.loads(second.stdout)["replayed"] is True
    assert json.loads(second.stdout)["decision"] == "DECISION_APPROVE"


def test_score_without_a_time_is_a_usage_error(server: RunningServer) -> None:
    args = _score_args("tx-1", "--number", "1")
    at = args.index("--time")
    result = run(server, *args[:at], *args[at + 2 :], key=server.key("gateway"))
    assert result.exit_code == 2
    assert "Missing option '--time'" in result.stderr


# -- numbers out of range ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (_score_args("t", "--number", "1", amount="99999999999999999999"), "--amount-minor"),
        (_score_args("t", "--number", "1", amount="0"), "--amount-minor"),
        (_score_args("t", "--number", "1", amount="-5"), "--amount-minor"),
        ([*_score_args("t", "--number", "1"), "--lat", "nan", "--lon", "0"], "--lat"),
        (["customers", "--page-size", str(2**31)], "--page-size"),
        (["keys", "list", "--page-size", "99999999999999999999"], "--page-size"),
        (["models", "list", "--page-size", "-1"], "--page-size"),
        (["audit", "list", "--page-size", str(2**31)], "--page-size"),
        (["audit", "verify", "--from-sequence", str(2**63)], "--from-sequence"),
        (["--timeout", "nan", "health"], "--timeout"),
        (["--timeout", "inf", "health"], "--timeout"),
    ],
)
def test_numbers_out_of_range_are_usage_errors_naming_the_option(
    server: RunningServer, args: list[str], option: str
) -> None:
    result = run(server, *args, key=server.key("admin"))
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.stderr
    assert result.stdout == ""


def test_the_largest_amount_the_contract_holds_reaches_the_server(server: RunningServer) -> None:
    result = run(server, *_score_args("t", "--number", "1", amount=str(2**63 - 1)), key=server.key("gateway"))
    assert result.exit_code == 1
    assert "transaction.amount.amount_minor: must be at most" in result.stderr


# -- required options ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "required"),
    [
        (["score"], ("--transaction-id", "--amount-minor", "--currency", "--merchant-id", "--time")),
        (["redeem"], ("--merchant-id",)),
        (["models", "promote"], ("--version", "--reason")),
        (["models", "rollback"], ("--reason",)),
    ],
)
def test_required_options_are_marked_in_help(command: list[str], required: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*command, "--help"], env=dict.fromkeys(_CLIENT_VARIABLES))
    assert result.exit_code == 0, result.output
    # Help wraps an option's text over lines: join each option's block before looking for the marker.
    blocks = re.split(r"\n(?=  -)", result.stdout)
    for option in required:
        (block,) = [b for b in blocks if b.lstrip().startswith(option + " ")]
        assert "required]" in block, block


def test_a_missing_merchant_is_a_usage_error(server: RunningServer) -> None:
    args = _score_args("tx-1", "--number", "1")
    at = args.index("--merchant-id")
    score = run(server, *args[:at], *args[at + 2 :], key=server.key("gateway"))
    assert score.exit_code == 2
    assert "Missing option '--merchant-id'" in score.stderr
    redeem = run(server, "redeem", "123456789012345678", key=server.key("gateway"))
    assert redeem.exit_code == 2
    assert "Missing option '--merchant-id'" in redeem.stderr


# -- empty and paged lists -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "empty", "field"),
    [
        (["customers", "--status", "revoked"], "no customers match", "customers"),
        (["keys", "list", "--role", "trainer"], "no keys match", "keys"),
        (["models", "list"], "no models match", "models"),
        (["audit", "list", "--action", "no.such.action"], "no audit events match", "events"),
    ],
)
def test_an_empty_list_says_so(server: RunningServer, args: list[str], empty: str, field: str) -> None:
    admin = server.key("admin")
    result = run(server, *args, key=admin)
    assert result.exit_code == 0, result.output
    assert result.stdout == empty + "\n"

    as_json = run(server, "--json", *args, key=admin)
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout) == {field: [], "next_page_token": ""}


def test_a_page_that_is_cut_off_ends_with_how_to_go_on(server: RunningServer) -> None:
    admin = server.key("admin")
    for i in range(2):
        created = run(server, "keys", "create", "--role", "gateway", "--name", f"till {i}", key=admin)
        assert created.exit_code == 0, created.output
    seen: list[str] = []
    token: list[str] = []
    for _ in range(5):
        page = run(server, "keys", "list", "--page-size", "1", *token, key=admin)
        assert page.exit_code == 0, page.output
        lines = page.stdout.splitlines()
        seen += [line.split(": ", 1)[1] for line in lines if line.startswith("  - key_id: ")]
        if not lines[-1].startswith("more: "):
            break
        assert "next_page_token" not in page.stdout
        token = lines[-1].removeprefix("more: ").split(" ", 1)
        assert token[0] == "--page-token"
    assert len(seen) == 3  # the admin's own key and the two made here, one page each
    assert len(set(seen)) == 3


# -- a missing key -------------------------------------------------------------------------------------------


def test_a_missing_key_names_the_variable_and_the_option(server: RunningServer) -> None:
    result = run(server, "keys", "list")
    assert result.exit_code == 1
    assert result.stderr == (
        "error: UNAUTHENTICATED (API_KEY_MISSING): no API key: set POSGUARD_API_KEY or pass --api-key\n"
    )
    as_json = run(server, "--json", "keys", "list")
    assert json.loads(as_json.stderr)["message"] == "no API key: set POSGUARD_API_KEY or pass --api-key"


def test_a_wrong_key_keeps_the_servers_message(server: RunningServer) -> None:
    result = run(server, "keys", "list", key="pgk_000000000000_nope")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: UNAUTHENTICATED")
    assert "POSGUARD_API_KEY" not in result.stderr


# -- models --------------------------------------------------------------------------------------------------


def _register(server: RunningServer, version: str, customers: tuple[str, ...]) -> None:
    register_models(server.server.database, version, customers)


@pytest.fixture
def two_runs(server: RunningServer) -> RunningServer:
    """Runs r1 (global, c1, c2) and r2 (global, c1) registered as candidates."""
    with server.server.database.session() as session:
        for customer_id in ("c1", "c2"):
            session.add(
                SqlCustomer(
                    customer_id=customer_id, issuer="test", created_at=T0, updated_at=T0, created_by="t"
                )
            )
    _register(server, "r1", ("c1", "c2"))
    _register(server, "r2", ("c1",))
    return server


def _models(server: RunningServer, *args: str) -> list[tuple[str, str, bool]]:
    result = run(server, "--json", "models", "list", *args, key=server.key("trainer"))
    assert result.exit_code == 0, result.output
    return [(m["version"], m["customer_id"], m["active"]) for m in json.loads(result.stdout)["models"]]


def _models_call(server: RunningServer, *args: str) -> Any:
    result = run(server, "--json", "models", *args, key=server.key("trainer"))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_models_promote_and_rollback_are_global_without_a_customer(two_runs: RunningServer) -> None:
    promoted = _models_call(two_runs, "promote", "--version", "r1", "--reason", "first run")
    assert (promoted["model"]["scope"], promoted["customer_models"]) == ("MODEL_SCOPE_GLOBAL", 2)
    assert _models(two_runs, "--active", "--scope", "global") == [("r1", "", True)]
    second = _models_call(two_runs, "promote", "--version", "r2", "--force", "--reason", "second run")
    assert (second["model"]["version"], second["previous_version"]) == ("r2", "r1")

    back = _models_call(two_runs, "rollback", "--reason", "second run misbehaves")
    assert (back["rolled_back_version"], back["model"]["version"]) == ("r2", "r1")
    assert _models(two_runs, "--active", "--scope", "global") == [("r1", "", True)]


def test_models_promote_and_rollback_of_one_customer(two_runs: RunningServer) -> None:
    _models_call(two_runs, "promote", "--version", "r1", "--reason", "first run")
    one = _models_call(
        two_runs, "promote", "--version", "r2", "--customer", "c1", "--force", "--reason", "better for c1"
    )
    assert (one["model"]["scope"], one["model"]["customer_id"], one["previous_version"]) == (
        "MODEL_SCOPE_CUSTOMER",
        "c1",
        "r1",
    )
    assert _models(two_runs, "--customer", "c1", "--active") == [("r2", "c1", True)]
    # The global model stays: only c1's moved.
    assert _models(two_runs, "--active", "--scope", "global") == [("r1", "", True)]

    back = _models_call(two_runs, "rollback", "--customer", "c1", "--reason", "worse after all")
    assert (back["rolled_back_version"], back["model"]["version"]) == ("r2", "r1")
    assert _models(two_runs, "--customer", "c1", "--active") == [("r1", "c1", True)]


def test_models_list_pages_with_a_last_line_to_go_on(two_runs: RunningServer) -> None:
    trainer = two_runs.key("trainer")
    versions: list[str] = []
    token: list[str] = []
    for _ in range(5):
        page = run(two_runs, "models", "list", "--page-size", "2", *token, key=trainer)
        assert page.exit_code == 0, page.output
        lines = page.stdout.splitlines()
        versions += [line.split(": ", 1)[1] for line in lines if line.startswith("    version: ")]
        if not lines[-1].startswith("more: "):
            break
        assert re.fullmatch(r"more: --page-token \S+", lines[-1]), page.stdout
        token = lines[-1].split()[1:]
    assert sorted(versions) == ["r1", "r1", "r1", "r2", "r2"]


@pytest.mark.parametrize(
    "args",
    [
        ["models", "promote", "--scope", "global", "--version", "r1", "--reason", "r"],  # scope is inferred
        ["models", "rollback", "--customer", "c1", "--version", "r1", "--reason", "r"],  # run: global only
        ["models", "list", "--scope", "global", "--customer", "c1"],  # contradicts itself
        ["models", "list", "--customer-id", "c1"],  # renamed to --customer
        ["models", "list", "--active-only"],  # renamed to --active
        ["models", "list", "--scope", "none"],  # no model lives there
    ],
)
def test_model_usage_errors_exit_2_without_calling(server: RunningServer, args: list[str]) -> None:
    result = run(server, *args, key=server.key("trainer"))
    assert result.exit_code == 2, result.output


def test_the_client_and_the_api_agree_on_model_scopes(two_runs: RunningServer) -> None:
    # What the command line shows is what the API holds: the same versions, customers and scopes.
    with posguard.Client(two_runs.target, api_key=two_runs.key("trainer")) as client:
        api = [(m.version, m.customer_id, m.active) for m in client.list_models(page_size=100).models]
        of_c1 = {
            m.version
            for m in client.list_models(scope=risk_pb2.MODEL_SCOPE_CUSTOMER, customer_id="c1").models
        }
    assert _models(two_runs, "--page-size", "100") == api
    assert {v for v, _, _ in _models(two_runs, "--scope", "customer", "--customer", "c1")} == of_c1
