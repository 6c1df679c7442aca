"""Shadow scoring end to end: a real server, the real client, two trained runs, on SQLite and PostgreSQL.

One database and one server go through three phases that score the same transactions from the same state
(the scored rows are removed and the profiles put back between phases):

A. run 1 active, run 2 in shadow;  B. run 1 active, nothing in shadow;  C. run 2 active.

The answers of A must be those of B (the shadow never changes an answer), and the shadow scores stored in A
must be the scores C answers (the shadow really scores with run 2's models). Run 2 retrained only some
customers, as an incremental run does, and picked another label-feedback window than run 1.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import delete, select

import posguard
from posguard.v1 import common_pb2, risk_pb2
from posguard_models.training import TrainingConfig, train
from posguard_server.domain.risk import ModelScope, ProfileSnapshot
from posguard_server.issuers import build_numbering
from posguard_server.pipeline.importer import CsvTransaction, Importer, read_outcomes, read_transactions
from posguard_server.pipeline.report import write_report
from posguard_server.pipeline.retrain import evaluate_run, live_shadow_scores
from posguard_server.pipeline.trainer import load_history, register
from posguard_server.store.migrate import upgrade
from posguard_server.store.profiles import SqlProfileStore
from posguard_server.store.risk_tables import SqlRiskTransaction

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..conftest import RiskStores
    from .conftest import RunningServer

SAMPLE = Path(__file__).parents[1] / "data" / "handbook_sample.csv.gz"
LABEL_DELAY = timedelta(days=7)
REFRESH_SECONDS = 0.2
SMALL = {"n_estimators": 30, "customer_estimators": 10, "customer_min_history": 30}
Stored = tuple[str | None, float | None, float | None]  # shadow_version, shadow_risk_score, risk_score


@pytest.fixture
def running(server_factory: Callable[..., RunningServer], database_url: str) -> RunningServer:
    upgrade(database_url)
    return server_factory(database_url=database_url, model_refresh_seconds=REFRESH_SECONDS)


def _import(server: RunningServer) -> list[CsvTransaction]:
    database = server.server.database
    importer = Importer.on(database, build_numbering(server.settings))
    importer.import_rows(read_transactions(SAMPLE))
    importer.import_outcomes(read_outcomes(SAMPLE, delay=LABEL_DELAY))
    return list(read_transactions(SAMPLE))


def _payments(rows: list[CsvTransaction]) -> list[risk_pb2.Transaction]:
    """A day after the history: every customer at their usual terminal, then at terminals with fraud."""
    end = max(row.transaction.event_time for row in rows)
    at = end + timedelta(days=1)
    # Fraud reported by ``at`` but more than a week before it: run 1's 7-day window misses it, run 2's
    # 28-day window counts it.
    fraud_terminals = sorted(
        {
            row.transaction.terminal_id
            for row in rows
            if row.is_fraud and at - timedelta(days=28) <= row.transaction.event_time < at - LABEL_DELAY
        }
    )
    assert fraud_terminals, "the sample has no fraud in the window this test needs"
    usual: dict[str, Counter[str]] = {}
    for row in rows:
        usual.setdefault(row.customer_ref, Counter())[row.transaction.terminal_id] += 1
    payments: list[risk_pb2.Transaction] = []
    for i, (ref, terminals) in enumerate(sorted(usual.items())):
        for j, (terminal, amount) in enumerate(
            [(terminals.most_common(1)[0][0], 31_50), (fraud_terminals[i % len(fraud_terminals)], 4_800_00)]
        ):
            txn = risk_pb2.Transaction(
                transaction_id=f"p-{i}-{j}",
                external_id=common_pb2.ExternalId(namespace="source", value=ref),
                amount=common_pb2.Money(amount_minor=amount, currency="EUR"),
                merchant_id=terminal,
                terminal_id=terminal,
            )
            txn.event_time.FromDatetime(at + timedelta(minutes=10 * (2 * i + j)))
            payments.append(txn)
    return payments


def _score(
    server: RunningServer, payments: list[risk_pb2.Transaction], phase: str
) -> list[risk_pb2.ScoreTransactionResponse]:
    answers = []
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        for payment in payments:
            txn = risk_pb2.Transaction()
            txn.CopyFrom(payment)
            txn.transaction_id = f"{phase}-{payment.transaction_id}"
            answer = client.score_transaction(transaction=txn)
            assert not answer.replayed
            answers.append(answer)
    return answers


def _stored(server: RunningServer, phase: str) -> dict[str, Stored]:
    """What phase ``phase`` stored, by payment id."""
    t = SqlRiskTransaction
    with server.server.database.session(read_only=True) as session:
        rows = session.execute(
            select(t.transaction_id, t.shadow_version, t.shadow_risk_score, t.risk_score).where(
                t.transaction_id.like(f"{phase}-%")
            )
        )
        return {tid.removeprefix(f"{phase}-"): (version, shadow, risk) for tid, version, shadow, risk in rows}


def _rewind(server: RunningServer, phase: str, profiles: list[tuple[str, ProfileSnapshot]]) -> None:
    """Remove what phase ``phase`` scored and put the profiles back: the next phase starts where it did."""
    with server.server.database.session() as session:
        session.execute(
            delete(SqlRiskTransaction).where(SqlRiskTransaction.transaction_id.like(f"{phase}-%"))
        )
    SqlProfileStore(server.server.database).put_profiles(profiles, now=datetime.now(UTC))


def _answer(answer: risk_pb2.ScoreTransactionResponse) -> risk_pb2.ScoreTransactionResponse:
    """The answer without what differs between phases by construction: the transaction id and the time."""
    result = risk_pb2.ScoreTransactionResponse()
    result.CopyFrom(answer)
    result.ClearField("transaction_id")
    result.ClearField("scored_at")
    return result


def _reloaded() -> None:
    """Servers read the registry's generation at most every REFRESH_SECONDS: wait past one check."""
    time.sleep(3 * REFRESH_SECONDS)


def test_a_shadow_run_is_scored_and_stored_but_never_answers(
    running: RunningServer, risk_stores: RiskStores, tmp_path: Path
) -> None:
    rows = _import(running)
    store = risk_stores  # on the server's database
    history = load_history(store.history)
    run_1 = train(history, TrainingConfig(seed=0, feedback_windows_days=(7.0,), **SMALL))
    run_2 = train(history, TrainingConfig(seed=1, feedback_windows_days=(28.0,), **SMALL))
    assert run_1.global_model.feedback is not None
    assert run_2.global_model.feedback is not None
    # Run 2 retrained every other customer only; the rest keep run 1's models in the comparison too.
    retrained = run_2.customer_models[::2]
    assert 0 < len(retrained) < len(run_1.customer_models)
    register(store.registry, run_1, version="run-1", activate=True, actor="test")
    register(
        store.registry,
        dataclasses.replace(run_2, customer_models=retrained),
        version="run-2",
        activate=False,
        actor="test",
    )
    assert store.shadow.set_shadow("run-2", now=datetime.now(UTC), actor="test") == 1 + len(retrained)

    payments = _payments(rows)
    before = [
        (c, p)
        for c in sorted(set(history.customers.tolist()))
        if (p := store.profiles.profile(c)) is not None
    ]
    assert len(before) == len({payment.external_id.value for payment in payments})

    # A: run 1 answers, run 2 is scored in shadow.
    _reloaded()
    shadowed = _score(running, payments, "a")
    stored_a = _stored(running, "a")
    assert {a.model.version for a in shadowed} == {"run-1"}
    assert len(stored_a) == len(payments)
    assert {version for version, _, _ in stored_a.values()} == {"run-2"}
    pairs = store.shadow.shadow_pairs("run-2")
    assert len(pairs) == len(payments)
    assert pairs.active_scores == tuple(a.risk_score for a in shadowed)
    # Another model scored: the shadow scores are not the answers copied.
    assert (
        sum(a != s for a, s in zip(pairs.active_scores, pairs.shadow_scores, strict=True))
        > len(payments) // 2
    )
    # The report of run 2 shows these live scores next to its offline comparison.
    live = live_shadow_scores(store.shadow, "run-2")
    assert live is not None
    assert tuple(live.shadow_risk) == pairs.shadow_scores
    report = evaluate_run(store.history, store.registry, "run-2").report(
        "run-2", review=0.99, decline=0.999, shadow=live
    )
    files = write_report(report, tmp_path / "report")
    assert (tmp_path / "report" / "shadow.png") in files.images
    assert "run-2" in files.html.read_text()
    _rewind(running, "a", before)

    # B: nothing in shadow. The answers are exactly those given while run 2 was in shadow.
    assert store.shadow.clear_shadow(now=datetime.now(UTC), actor="test") == 1 + len(retrained)
    _reloaded()
    plain = _score(running, payments, "b")
    assert [_answer(a) for a in plain] == [_answer(a) for a in shadowed]
    assert {(version, shadow) for version, shadow, _ in _stored(running, "b").values()} == {(None, None)}
    _rewind(running, "b", before)

    # C: run 2 active. It answers what it scored in shadow, transaction by transaction.
    store.registry.activate_many(
        [(ModelScope.GLOBAL, "", "run-2")] + [(ModelScope.CUSTOMER, m.customer, "run-2") for m in retrained],
        now=datetime.now(UTC),
    )
    _reloaded()
    promoted = _score(running, payments, "c")
    assert "run-2" in {a.model.version for a in promoted}
    stored_c = _stored(running, "c")
    assert {payment: stored_c[payment][2] for payment in stored_c} == {
        payment: stored_a[payment][1] for payment in stored_a
    }
    assert [a.risk_score for a in promoted] == list(pairs.shadow_scores)
