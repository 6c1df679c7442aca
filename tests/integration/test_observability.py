"""Operations view of a running server: JSON access logs (or text), score and decision metrics, overload.

The log tests run ``posguard-server serve`` as a process and read its stderr, exactly what a log collector
receives; the metrics tests scrape the server's own /metrics endpoint.
"""

from __future__ import annotations

import json
import re
import urllib.request
import uuid
from typing import TYPE_CHECKING

import pytest

import posguard
from posguard.v1 import common_pb2, risk_pb2
from posguard_server.domain.customers import mask

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Cli, RunningServer, ServeProcess

SCORE = "/posguard.v1.Risk/ScoreTransaction"


def _transaction(number: str) -> risk_pb2.Transaction:
    transaction = risk_pb2.Transaction(
        transaction_id="tx-" + uuid.uuid4().hex,
        customer_number=number,
        amount=common_pb2.Money(amount_minor=3_150, currency="CNY"),
        merchant_id="m-1",
        terminal_id="t-1",
        mcc="5411",
        channel=common_pb2.CHANNEL_POS,
    )
    transaction.event_time.GetCurrentTime()
    return transaction


def _serve_and_score(
    tmp_path: Path, cli: Cli, serve_process: ServeProcess, *flags: str
) -> tuple[list[str], str]:
    created = cli("--data-dir", str(tmp_path), "keys", "create", "--role", "gateway", "--json")
    token = json.loads(created.stdout)["token"]
    process, port = serve_process(tmp_path, *flags)
    with posguard.Client(f"127.0.0.1:{port}", api_key=token) as client:
        number = client.issue_customer_id().customer.primary.number
        answer = client.score_transaction(transaction=_transaction(number))
    process.terminate()
    assert process.stderr is not None
    lines = process.stderr.read().splitlines()  # to EOF: the process has exited
    process.wait(timeout=30)
    return lines, number, answer


def test_access_log_is_one_json_object_per_call_with_masked_customer_and_model(
    tmp_path: Path, cli: Cli, serve_process: ServeProcess
) -> None:
    lines, number, answer = _serve_and_score(tmp_path, cli, serve_process)
    entries = [json.loads(line) for line in lines]  # every line, not only the access log, is JSON
    scored = [e for e in entries if e.get("method") == SCORE]
    assert len(scored) == 1, entries
    entry = scored[0]
    assert entry["logger"] == "posguard_server.access"
    assert entry["code"] == "OK"
    assert entry["latency_ms"] > 0
    assert entry["customer"] == mask(number)
    assert entry["model_version"] == (answer.model.version or "-")  # "-": no model yet, a rule decided
    assert all(number not in line for line in lines)


def test_log_format_text_is_for_people(tmp_path: Path, cli: Cli, serve_process: ServeProcess) -> None:
    lines, number, _ = _serve_and_score(tmp_path, cli, serve_process, "--log-format", "text")
    access = [line for line in lines if f"posguard_server.access: {SCORE} OK" in line]
    assert len(access) == 1, lines
    assert f"customer={mask(number)}" in access[0]
    assert re.search(r" \d+\.\d\dms ", access[0])
    with pytest.raises(json.JSONDecodeError):
        json.loads(access[0])


def _scrape(server: RunningServer) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5) as page:
        return str(page.read().decode())


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample, 0 when absent (labels in any order)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_new_decisions_scores_and_model_versions_but_not_replays(server: RunningServer) -> None:
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        number = client.issue_customer_id().customer.primary.number
        transactions = [_transaction(number) for _ in range(3)]
        answers = [client.score_transaction(transaction=t) for t in transactions]
        assert client.score_transaction(transaction=transactions[0]).replayed  # not a new decision
    decision = risk_pb2.Decision.Name(answers[0].decision).removeprefix("DECISION_")
    scope = risk_pb2.ModelScope.Name(answers[0].model.scope).removeprefix("MODEL_SCOPE_")
    text = _scrape(server)
    assert _metric(text, "posguard_risk_decisions_total", decision=decision, scope=scope) == 3
    assert _metric(text, "posguard_risk_score_count", scope=scope) == 3
    assert (
        _metric(
            text, "posguard_risk_model_scores_total", scope=scope, version=answers[0].model.version or "-"
        )
        == 3
    )
