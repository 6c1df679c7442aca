"""ListModels, PromoteModel and RollbackModel on a real server and client; ``posguard-server models``.

Storage-touching tests run on SQLite and PostgreSQL. The last RPC test trains two real runs, serves them and
rolls one back through the API while the server keeps running.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

import posguard
from posguard.errors import from_rpc_error
from posguard.v1 import admin_pb2, admin_pb2_grpc, common_pb2, risk_pb2
from posguard_models.training import TrainingConfig, train
from posguard_server.cli import main
from posguard_server.domain.risk import (
    METRIC_AP,
    METRIC_BASELINE_AP,
    METRIC_EVALUATED_AT,
    ModelScope,
    ModelStatus,
    NewModel,
)
from posguard_server.issuers import build_numbering
from posguard_server.pipeline.importer import Importer, read_outcomes, read_transactions
from posguard_server.pipeline.trainer import load_history, register
from posguard_server.store.audit import SqlAuditEvent, SqlAuditStore
from posguard_server.store.customers import SqlCustomer
from posguard_server.store.db import Database
from posguard_server.store.history import SqlHistoryStore
from posguard_server.store.migrate import upgrade
from posguard_server.store.model_registry import SqlModelRegistry

if TYPE_CHECKING:
    from .conftest import RunningServer

A = admin_pb2
GLOBAL, CUSTOMER = risk_pb2.MODEL_SCOPE_GLOBAL, risk_pb2.MODEL_SCOPE_CUSTOMER
T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
SAMPLE = Path(__file__).parents[1] / "data" / "handbook_sample.csv.gz"
REFRESH_SECONDS = 0.2


@pytest.fixture
def running(server_factory: Callable[..., RunningServer], database_url: str) -> RunningServer:
    """A server on each backend; a shared database is migrated first, as an operator would."""
    upgrade(database_url)
    return server_factory(database_url=database_url, model_refresh_seconds=REFRESH_SECONDS)


def _add_customers(database: Database, *customer_ids: str) -> None:
    with database.session() as session:
        for customer_id in customer_ids:
            session.add(
                SqlCustomer(
                    customer_id=customer_id, issuer="test", created_at=T0, updated_at=T0, created_by="t"
                )
            )


def _register(
    database: Database,
    version: str,
    customers: tuple[str, ...],
    *,
    with_global: bool = True,
    metrics: Mapping[str, float] | None = None,
) -> None:
    scopes = ([(ModelScope.GLOBAL, "")] if with_global else []) + [
        (ModelScope.CUSTOMER, c) for c in customers
    ]
    SqlModelRegistry(database).add_models(
        [
            NewModel(
                scope=scope,
                customer_id=customer,
                version=version,
                created_at=T0,
                training_window_start=T0 - timedelta(days=30),
                training_window_end=T0,
                sample_count=250,
                metrics=dict(metrics or {}),
                artifact=b"not a real model",
            )
            for scope, customer in scopes
        ]
    )


def _registry(database: Database) -> tuple[object, ...]:
    """Everything a registry call could change: generation, each model's status, the audit log's length."""
    store = SqlModelRegistry(database)
    models, _ = store.list_models(limit=1000)
    with database.session(read_only=True) as session:
        events = int(session.scalar(select(func.count()).select_from(SqlAuditEvent)) or 0)
    return (store.generation(), sorted((m.version, m.customer_id, m.status.value) for m in models), events)


@pytest.fixture
def two_runs(running: RunningServer) -> RunningServer:
    """Run r1 (global, c1, c2) and run r2 (global, c1, c3) registered as candidates on a running server."""
    database = running.server.database
    _add_customers(database, "c1", "c2", "c3")
    _register(database, "r1", ("c1", "c2"))
    _register(database, "r2", ("c1", "c3"))
    return running


def _trainer(server: RunningServer) -> posguard.Client:
    return posguard.Client(server.target, api_key=server.key("trainer"))


# -- ListModels ----------------------------------------------------------------------------------------


def test_list_models_pages_newest_first_with_filters(two_runs: RunningServer) -> None:
    with _trainer(two_runs) as client:
        client.promote_model(scope=GLOBAL, version="r1", reason="first run")
        seen: list[A.Model] = []
        token = ""
        while True:
            page = client.list_models(page_size=2, page_token=token)
            assert len(page.models) <= 2
            seen.extend(page.models)
            token = page.next_page_token
            if not token:
                break
        assert [(m.version, m.customer_id) for m in seen] == [
            ("r2", "c3"),
            ("r2", "c1"),
            ("r2", ""),
            ("r1", "c2"),
            ("r1", "c1"),
            ("r1", ""),
        ]
        first = seen[-1]
        assert (first.scope, first.status, first.active, first.sample_count) == (
            GLOBAL,
            A.MODEL_STATUS_ACTIVE,
            True,
            250,
        )
        assert first.created_at.ToDatetime(tzinfo=UTC) == T0
        assert first.training_window_end.ToDatetime(tzinfo=UTC) == T0
        assert seen[0].status == A.MODEL_STATUS_CANDIDATE
        assert not seen[0].active

        active = client.list_models(active_only=True).models
        assert sorted((m.version, m.customer_id) for m in active) == [("r1", ""), ("r1", "c1"), ("r1", "c2")]
        assert [m.version for m in client.list_models(scope=GLOBAL).models] == ["r2", "r1"]
        of_c1 = client.list_models(scope=CUSTOMER, customer_id="c1").models
        assert [(m.version, m.scope) for m in of_c1] == [("r2", CUSTOMER), ("r1", CUSTOMER)]
        assert [m.version for m in client.list_models(customer_id="c3").models] == ["r2"]


def test_list_models_shows_metrics(running: RunningServer) -> None:
    _add_customers(running.server.database, "c1")
    _register(running.server.database, "r1", ("c1",), metrics={METRIC_AP: 0.25, METRIC_BASELINE_AP: 0.2})
    with _trainer(running) as client:
        models = client.list_models(scope=GLOBAL).models
    assert dict(models[0].metrics) == {METRIC_AP: 0.25, METRIC_BASELINE_AP: 0.2}


# -- PromoteModel --------------------------------------------------------------------------------------


def test_promote_model_moves_a_whole_run_and_is_audited(two_runs: RunningServer) -> None:
    database = two_runs.server.database
    with _trainer(two_runs) as client:
        first = client.promote_model(scope=GLOBAL, version="r1", reason="first run")
        assert (first.model.version, first.model.scope, first.model.status) == (
            "r1",
            GLOBAL,
            A.MODEL_STATUS_ACTIVE,
        )
        assert (first.previous_version, first.customer_models) == ("", 2)

        # Run 2 has no evaluation and something is active: refused unless forced.
        with pytest.raises(posguard.FailedPreconditionError) as caught:
            client.promote_model(scope=GLOBAL, version="r2", reason="second run")
        assert caught.value.reason == "CANDIDATE_NOT_BETTER"
        assert "no evaluation" in caught.value.message
        second = client.promote_model(scope=GLOBAL, version="r2", reason="second run", force=True)
        assert (second.model.version, second.previous_version, second.customer_models) == ("r2", "r1", 2)

    assert {m.customer_id: m.version for m in SqlModelRegistry(database).active_models()} == {
        "": "r2",
        "c1": "r2",
        "c2": "r1",
        "c3": "r2",
    }
    events, _ = SqlAuditStore(database).list(action="model.promoted", limit=10)
    trainer_key = events[0].actor
    assert [(e.subject, e.actor) for e in events] == [("r1", trainer_key), ("r2", trainer_key)]
    assert trainer_key != "cli"
    assert events[1].details["forced"] == "true"
    assert "no evaluation" in events[1].details["overridden"]
    assert events[1].details["reason"] == "second run"


def test_promote_model_of_one_customer_and_of_a_customer_only_run(running: RunningServer) -> None:
    database = running.server.database
    _add_customers(database, "c1", "c2")
    _register(database, "r1", ("c1",))
    _register(database, "solo", ("c2",))
    _register(database, "inc", ("c1", "c2"), with_global=False)
    with _trainer(running) as client:
        client.promote_model(scope=GLOBAL, version="r1", reason="first run")
        one = client.promote_model(scope=CUSTOMER, customer_id="c2", version="solo", reason="c2 only")
        assert (one.model.customer_id, one.model.version, one.previous_version, one.customer_models) == (
            "c2",
            "solo",
            "",
            1,
        )
        metrics = {METRIC_AP: 0.5, METRIC_BASELINE_AP: 0.4, METRIC_EVALUATED_AT: time.time()}
        _register(database, "inc2", ("c1", "c2"), with_global=False, metrics=metrics)
        run = client.promote_model(scope=GLOBAL, version="inc2", reason="incremental run")
        assert not run.HasField("model")  # no global model in the run: the active one stays
        assert (run.previous_version, run.customer_models) == ("", 2)
        with pytest.raises(posguard.NotFoundError):
            client.promote_model(scope=GLOBAL, version="nope", reason="x")
        with pytest.raises(posguard.FailedPreconditionError) as caught:
            client.promote_model(scope=GLOBAL, version="r1", reason="again")
        assert caught.value.reason == "MODEL_ALREADY_ACTIVE"


# -- RollbackModel -------------------------------------------------------------------------------------


def test_rollback_model_restores_the_previous_run(two_runs: RunningServer) -> None:
    database = two_runs.server.database
    with _trainer(two_runs) as client:
        client.promote_model(scope=GLOBAL, version="r1", reason="first run")
        client.promote_model(scope=GLOBAL, version="r2", reason="second run", force=True)
        back = client.rollback_model(scope=GLOBAL, reason="alerts doubled")
        assert (back.model.version, back.model.status, back.rolled_back_version) == (
            "r1",
            A.MODEL_STATUS_ACTIVE,
            "r2",
        )
        assert (back.customer_models_restored, back.customer_models_retired) == (1, 1)
        assert {m.customer_id: m.version for m in SqlModelRegistry(database).active_models()} == {
            "": "r1",
            "c1": "r1",
            "c2": "r1",
        }
        with pytest.raises(posguard.FailedPreconditionError) as caught:
            client.rollback_model(scope=GLOBAL, reason="again")
        assert caught.value.reason == "NO_PREVIOUS_MODEL"
    events, _ = SqlAuditStore(database).list(action="model.rolled_back", limit=10)
    assert [(e.subject, e.details["restored_version"], e.details["reason"]) for e in events] == [
        ("r2", "r1", "alerts doubled")
    ]


def test_rollback_model_by_version_and_per_customer(running: RunningServer) -> None:
    database = running.server.database
    _add_customers(database, "c1", "c2")
    _register(database, "r1", ("c1", "c2"))
    _register(database, "r2", ("c1", "c2"))
    _register(database, "inc", ("c1", "c2"), with_global=False)
    with _trainer(running) as client:
        client.promote_model(scope=GLOBAL, version="r1", reason="first")
        client.promote_model(scope=GLOBAL, version="r2", reason="second", force=True)
        client.promote_model(scope=GLOBAL, version="inc", reason="incremental", force=True)

        by_version = client.rollback_model(scope=GLOBAL, version="inc", reason="bad incremental run")
        assert not by_version.HasField("model")
        assert (by_version.rolled_back_version, by_version.customer_models_restored) == ("inc", 2)
        one = client.rollback_model(scope=CUSTOMER, customer_id="c2", reason="c2 only")
        assert (one.model.customer_id, one.model.version, one.rolled_back_version) == ("c2", "r1", "r2")
        with pytest.raises(posguard.NotFoundError):
            client.rollback_model(scope=GLOBAL, version="nope", reason="x")
        with pytest.raises(posguard.FailedPreconditionError) as caught:
            client.rollback_model(scope=GLOBAL, version="inc", reason="x")
        assert caught.value.reason == "MODEL_NOT_ACTIVE"
    assert {m.customer_id: m.version for m in SqlModelRegistry(database).active_models()} == {
        "": "r2",
        "c1": "r2",
        "c2": "r1",
    }


# -- idempotency, roles, bad input ---------------------------------------------------------------------


def test_a_retry_with_the_same_request_id_returns_the_first_answer_and_changes_nothing(
    two_runs: RunningServer,
) -> None:
    database = two_runs.server.database
    with _trainer(two_runs) as client:
        client.promote_model(scope=GLOBAL, version="r1", reason="first run")
        request = A.PromoteModelRequest(
            request_id="promote-r2", scope=GLOBAL, version="r2", reason="x", force=True
        )
        first = client.promote_model(request)
        before = _registry(database)
        assert client.promote_model(request) == first
        assert _registry(database) == before
        with pytest.raises(posguard.InvalidArgumentError) as caught:
            client.promote_model(request_id="promote-r2", scope=GLOBAL, version="r1", reason="x", force=True)
        assert caught.value.reason == "IDEMPOTENCY_CONFLICT"
        assert [v.field for v in caught.value.field_violations] == ["request_id"]

        rollback = A.RollbackModelRequest(request_id="undo-r2", scope=GLOBAL, reason="y")
        back = client.rollback_model(rollback)
        before = _registry(database)
        assert client.rollback_model(rollback) == back
        assert _registry(database) == before
        assert back.rolled_back_version == "r2"
        # A request_id is scoped to its method: on RollbackModel, PromoteModel's is a new request (which
        # finds nothing to go back to), not a conflict.
        with pytest.raises(posguard.FailedPreconditionError) as refused:
            client.rollback_model(request_id="promote-r2", scope=GLOBAL, reason="y")
        assert refused.value.reason == "NO_PREVIOUS_MODEL"


def _raw(server: RunningServer, role: str, method: str, request: Any) -> Any:
    """Call an Admin RPC without the client library (which would fill in an empty request_id)."""
    with grpc.insecure_channel(server.target) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        try:
            return getattr(stub, method)(
                request, timeout=10, metadata=[("authorization", f"Bearer {server.key(role)}")]
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None


@pytest.mark.parametrize("role", ["gateway", "auditor"])
def test_other_roles_are_permission_denied(server: RunningServer, role: str) -> None:
    with posguard.Client(server.target, api_key=server.key(role)) as client:
        for call in (
            lambda: client.list_models(),
            lambda: client.promote_model(scope=GLOBAL, version="r1", reason="x"),
            lambda: client.rollback_model(scope=GLOBAL, reason="x"),
        ):
            with pytest.raises(posguard.PermissionDeniedError):
                call()


def test_an_admin_may_manage_models(server: RunningServer) -> None:
    with posguard.Client(server.target, api_key=server.key("admin")) as client:
        assert list(client.list_models().models) == []


_OTHER_FILTERS = "other-filters"
GOOD_PROMOTE: dict[str, Any] = {"scope": GLOBAL, "version": "r1", "reason": "ok"}
GOOD_ROLLBACK: dict[str, Any] = {"scope": GLOBAL, "reason": "ok"}
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("list_models", {"page_size": -1}, "page_size"),
    ("list_models", {"page_token": "not-a-token"}, "page_token"),
    ("list_models", {"page_token": _OTHER_FILTERS, "active_only": True}, "page_token"),
    ("list_models", {"scope": risk_pb2.MODEL_SCOPE_NONE}, "scope"),
    ("list_models", {"scope": 42}, "scope"),
    ("list_models", {"scope": GLOBAL, "customer_id": "c1"}, "customer_id"),
    ("list_models", {"customer_id": "c" * 33}, "customer_id"),
    ("promote_model", {**GOOD_PROMOTE, "scope": risk_pb2.MODEL_SCOPE_UNSPECIFIED}, "scope"),
    ("promote_model", {**GOOD_PROMOTE, "scope": risk_pb2.MODEL_SCOPE_NONE}, "scope"),
    ("promote_model", {**GOOD_PROMOTE, "scope": CUSTOMER}, "customer_id"),
    ("promote_model", {**GOOD_PROMOTE, "customer_id": "c1"}, "customer_id"),
    ("promote_model", {**GOOD_PROMOTE, "scope": CUSTOMER, "customer_id": "c" * 33}, "customer_id"),
    ("promote_model", {**GOOD_PROMOTE, "version": ""}, "version"),
    ("promote_model", {**GOOD_PROMOTE, "version": "v" * 65}, "version"),
    ("promote_model", {**GOOD_PROMOTE, "reason": ""}, "reason"),
    ("promote_model", {**GOOD_PROMOTE, "reason": "r" * 501}, "reason"),
    ("promote_model", {**GOOD_PROMOTE, "reason": "bell\x07"}, "reason"),
    ("promote_model", {**GOOD_PROMOTE, "request_id": "r" * 129}, "request_id"),
    ("rollback_model", {**GOOD_ROLLBACK, "scope": risk_pb2.MODEL_SCOPE_UNSPECIFIED}, "scope"),
    ("rollback_model", {**GOOD_ROLLBACK, "scope": risk_pb2.MODEL_SCOPE_NONE}, "scope"),
    ("rollback_model", {**GOOD_ROLLBACK, "scope": CUSTOMER}, "customer_id"),
    ("rollback_model", {**GOOD_ROLLBACK, "customer_id": "c1"}, "customer_id"),
    ("rollback_model", {**GOOD_ROLLBACK, "scope": CUSTOMER, "customer_id": "c1", "version": "r1"}, "version"),
    ("rollback_model", {**GOOD_ROLLBACK, "version": "v" * 65}, "version"),
    ("rollback_model", {**GOOD_ROLLBACK, "reason": ""}, "reason"),
    ("rollback_model", {**GOOD_ROLLBACK, "reason": "r" * 501}, "reason"),
    ("rollback_model", {**GOOD_ROLLBACK, "request_id": "caf\u00e9"}, "request_id"),
]


@pytest.mark.parametrize(
    ("method", "fields", "field"), CASES, ids=[f"{m}-{f}-{i}" for i, (m, _, f) in enumerate(CASES)]
)
def test_bad_input_is_invalid_argument_naming_the_field_and_changes_nothing(
    server: RunningServer, method: str, fields: dict[str, Any], field: str
) -> None:
    database = server.server.database
    _add_customers(database, "c1")
    _register(database, "r0", ("c1",))
    _register(database, "r1", ("c1",))
    with _trainer(server) as client:
        client.promote_model(scope=GLOBAL, version="r0", reason="something to roll back to")
        client.promote_model(scope=GLOBAL, version="r1", reason="something to roll back", force=True)
        _register(database, "r2", ("c1",))
        if fields.get("page_token") == _OTHER_FILTERS:
            token = client.list_models(page_size=1).next_page_token
            assert token
            fields = {**fields, "page_token": token}
        before = _registry(database)
        with pytest.raises(posguard.InvalidArgumentError) as caught:
            getattr(client, method)(**fields)
    assert caught.value.reason == "INVALID_ARGUMENT"
    assert field in [v.field for v in caught.value.field_violations]
    assert _registry(database) == before


@pytest.mark.parametrize(
    ("method", "request_message"),
    [
        ("PromoteModel", A.PromoteModelRequest(scope=GLOBAL, version="r1", reason="x")),
        ("RollbackModel", A.RollbackModelRequest(scope=GLOBAL, reason="x")),
    ],
)
def test_request_id_is_required(server: RunningServer, method: str, request_message: Any) -> None:
    with pytest.raises(posguard.InvalidArgumentError) as caught:
        _raw(server, "trainer", method, request_message)
    assert [v.field for v in caught.value.field_violations] == ["request_id"]


def test_every_bad_field_is_named_at_once(server: RunningServer) -> None:
    with pytest.raises(posguard.InvalidArgumentError) as caught:
        _raw(server, "trainer", "PromoteModel", A.PromoteModelRequest(scope=risk_pb2.MODEL_SCOPE_NONE))
    assert {v.field for v in caught.value.field_violations} == {"request_id", "scope", "version", "reason"}


# -- a rollback on a running server --------------------------------------------------------------------


def test_a_rollback_reaches_a_running_server_without_a_restart(running: RunningServer) -> None:
    database = running.server.database
    importer = Importer.on(database, build_numbering(running.settings))
    importer.import_rows(read_transactions(SAMPLE))
    importer.import_outcomes(read_outcomes(SAMPLE, delay=timedelta(days=7)))
    rows = list(read_transactions(SAMPLE))
    registry = SqlModelRegistry(database)
    history = load_history(SqlHistoryStore(database))
    small = {"n_estimators": 30, "customer_estimators": 10, "customer_min_history": 30}
    for seed, version in ((0, "run-1"), (1, "run-2")):
        register(
            registry,
            train(history, TrainingConfig(seed=seed, **small)),
            version=version,
            activate=False,
            actor="t",
        )
    # A customer with a model of their own in both runs.
    customer_ref = max(
        {row.customer_ref for row in rows}, key=lambda ref: sum(r.customer_ref == ref for r in rows)
    )
    at = max(row.transaction.event_time for row in rows) + timedelta(days=1)

    def score(n: int) -> risk_pb2.ScoreTransactionResponse:
        txn = risk_pb2.Transaction(
            transaction_id=f"live-{n}",
            external_id=common_pb2.ExternalId(namespace="source", value=customer_ref),
            amount=common_pb2.Money(amount_minor=31_50, currency="EUR"),
            merchant_id="m-live",
            terminal_id="t-live",
        )
        txn.event_time.FromDatetime(at + timedelta(minutes=n))
        with posguard.Client(running.target, api_key=running.key("gateway")) as gateway:
            answer: risk_pb2.ScoreTransactionResponse = gateway.score_transaction(transaction=txn)
        return answer

    def served_after_refresh(n: int, version: str) -> risk_pb2.ScoreTransactionResponse:
        """Score until the server serves ``version`` (it checks the registry every REFRESH_SECONDS)."""
        deadline = time.monotonic() + 10
        while True:
            answer = score(n)
            if answer.model.version == version or time.monotonic() > deadline:
                return answer
            n += 1000
            time.sleep(REFRESH_SECONDS)

    with _trainer(running) as trainer:
        trainer.promote_model(scope=GLOBAL, version="run-1", reason="first run")
        assert served_after_refresh(1, "run-1").model.version == "run-1"
        promoted = trainer.promote_model(scope=GLOBAL, version="run-2", reason="second run", force=True)
        assert promoted.previous_version == "run-1"
        on_run_2 = served_after_refresh(2, "run-2")
        assert (on_run_2.model.version, on_run_2.model.scope) == ("run-2", risk_pb2.MODEL_SCOPE_CUSTOMER)

        back = trainer.rollback_model(scope=GLOBAL, reason="run 2 misbehaves")
        assert (back.rolled_back_version, back.model.version) == ("run-2", "run-1")
        on_run_1 = served_after_refresh(3, "run-1")
        assert (on_run_1.model.version, on_run_1.model.scope) == ("run-1", risk_pb2.MODEL_SCOPE_CUSTOMER)


# -- posguard-server models ----------------------------------------------------------------------------


def _cli(url: str, *args: str) -> Any:
    return CliRunner().invoke(main, ["--database-url", url, "models", *args], catch_exceptions=False)


def test_cli_lists_promotes_and_rolls_back(database: Database, database_url: str) -> None:
    _add_customers(database, "c1", "c2")
    _register(database, "r1", ("c1",))
    # Evaluated against run 1 once it is active (the promotion below, within the hour), and worse than it.
    r2_metrics = {METRIC_AP: 0.2, METRIC_BASELINE_AP: 0.3, METRIC_EVALUATED_AT: time.time() + 3600}
    _register(database, "r2", ("c1", "c2"), metrics=r2_metrics)
    _register(database, "inc", ("c2",), with_global=False)

    promoted = _cli(database_url, "promote", "--version", "r1", "--reason", "first run")
    assert promoted.exit_code == 0, promoted.output
    assert promoted.output == "promoted run r1: global model and 1 customer model\n"

    refused = _cli(database_url, "promote", "--version", "r2", "--reason", "second run")
    assert refused.exit_code == 1
    assert "CANDIDATE_NOT_BETTER" in refused.output
    assert "worse than the active model" in refused.output
    forced = _cli(database_url, "promote", "--version", "r2", "--force", "--reason", "second run")
    assert forced.exit_code == 0, forced.output
    assert forced.output.startswith(
        "promoted run r2: global model (replacing r1) and 2 customer models; forced over:"
    )

    listed = _cli(database_url, "list", "--active", "--json")
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.output.splitlines()]
    assert sorted((r["version"], r["customer_id"], r["status"]) for r in rows) == [
        ("r2", "", "ACTIVE"),
        ("r2", "c1", "ACTIVE"),
        ("r2", "c2", "ACTIVE"),
    ]
    assert rows[0]["metrics"] == r2_metrics
    table = _cli(database_url, "list", "--scope", "global").output
    assert table.splitlines()[0].startswith("VERSION")
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["r2", "r1"]
    assert "0.2000 (0.3000)" in table
    assert len(_cli(database_url, "list", "--customer", "c1", "--json").output.splitlines()) == 2

    one = _cli(database_url, "rollback", "--customer", "c1", "--reason", "c1 only")
    assert one.exit_code == 0, one.output
    assert one.output == "rolled back r2 for customer c1: back to r1\n"
    back = _cli(database_url, "rollback", "--reason", "alerts doubled")
    assert back.exit_code == 0, back.output
    assert back.output == (
        "rolled back run r2: back to r1; 0 customer models restored, 1 retired (scored by the global model)\n"
    )
    again = _cli(database_url, "rollback", "--reason", "again")
    assert again.exit_code == 1
    assert "NO_PREVIOUS_MODEL" in again.output

    inc = _cli(database_url, "promote", "--version", "inc", "--reason", "incremental")
    assert inc.output == "promoted run inc: 1 customer model (no global model)\n"
    undone = _cli(database_url, "rollback", "--version", "inc", "--reason", "undo incremental")
    assert undone.output == (
        "rolled back run inc: global model unchanged; 0 customer models restored, 1 retired "
        "(scored by the global model)\n"
    )
    missing = _cli(database_url, "promote", "--version", "nope", "--reason", "x")
    assert missing.exit_code == 1
    assert "MODEL_NOT_FOUND" in missing.output

    events, _ = SqlAuditStore(database).list(limit=20)
    assert [(e.action, e.subject, e.actor) for e in events] == [
        ("model.promoted", "r1", "cli"),
        ("model.promoted", "r2", "cli"),
        ("model.rolled_back", "r2", "cli"),
        ("model.rolled_back", "r2", "cli"),
        ("model.promoted", "inc", "cli"),
        ("model.rolled_back", "inc", "cli"),
    ]
    statuses = {
        (m.version, m.customer_id): m.status for m in SqlModelRegistry(database).list_models(limit=20)[0]
    }
    assert statuses[("inc", "c2")] is ModelStatus.RETIRED


def test_cli_reports_bad_input_without_a_traceback(database: Database, database_url: str) -> None:
    result = _cli(database_url, "rollback", "--customer", "c1", "--version", "r1", "--reason", "x")
    assert result.exit_code == 1
    assert "version is only for the GLOBAL scope" in result.output
    assert _cli(database_url, "promote", "--version", "r1").exit_code == 2  # --reason is required
