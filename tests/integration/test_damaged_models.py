"""Damaged model artifacts never fail a score and never approve by default; health and metrics say so.

A real server on each backend scores through the real client while the test damages the active models'
artifacts in the database, one random bit at a time, as a bad disk or a bad copy would: the server keeps the
model it had, answers every call, and counts every damaged model it refused. Without any usable model, the
answer is the configured no-model decision and the Risk service reports NOT_SERVING.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import select, update

import posguard
from posguard.v1 import common_pb2, risk_pb2
from posguard_models.training import History, TrainingConfig, train
from posguard_server.domain.risk import ModelScope, artifact_digest
from posguard_server.pipeline.trainer import register
from posguard_server.store.migrate import upgrade
from posguard_server.store.model_registry import SqlModelRegistry
from posguard_server.store.risk_tables import GENERATION, MODELS

if TYPE_CHECKING:
    from .conftest import RunningServer

R = risk_pb2
REFRESH_SECONDS = 0.01  # short: the bit-flip test waits twice this for each of its 240 stores
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RISK, CUSTOMER_IDS = "posguard.v1.Risk", "posguard.v1.CustomerIds"
# Bits flipped per test: a few percent of flips made loading raise something other than ValueError before.
FLIPS = 120


def _transaction(number: str, when: datetime) -> R.Transaction:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return R.Transaction(
        transaction_id="tx-" + uuid.uuid4().hex,
        customer_number=number,
        amount=common_pb2.Money(amount_minor=25_00, currency="CNY"),
        merchant_id="m-1",
        terminal_id="t-1",
        mcc="5411",
        channel=common_pb2.CHANNEL_POS,
        event_time=stamp,
    )


class Scene:
    """A server, a customer with a model of their own, and run v1 (global and customer model) active."""

    def __init__(
        self, server_factory: Callable[..., RunningServer], database_url: str, **settings: Any
    ) -> None:
        upgrade(database_url)
        self.make = lambda **more: server_factory(
            database_url=database_url, model_refresh_seconds=REFRESH_SECONDS, **{**settings, **more}
        )
        self.server = self.make()
        self.database = self.server.server.database
        self.client = posguard.Client(self.server.target, api_key=self.server.key("gateway"), timeout=10)
        customer = self.client.issue_customer_id().customer
        self.customer_id, self.number = customer.customer_id, customer.primary.number
        rng = np.random.default_rng(7)
        n = 120
        history = History(
            customers=np.array([self.customer_id] * n, dtype=object),
            times=np.sort(rng.uniform(0, 60 * 86400, n))
            + (datetime.now(UTC) - timedelta(days=90)).timestamp(),
            amounts=rng.lognormal(3.0, 0.6, n),
            keys=np.array(["t-1"] * n, dtype=object),
            fraud=np.zeros(n, dtype=bool),
            label_times=np.full(n, np.nan),
        )
        trained = train(history, TrainingConfig(seed=0, n_estimators=10, customer_estimators=10))
        self.registry = SqlModelRegistry(self.database)
        register(self.registry, trained, version="v1", activate=True, actor="test")
        time.sleep(REFRESH_SECONDS * 2)  # the running server picks the promotion up
        self.intact = {scope: self._artifact(scope) for scope in (ModelScope.GLOBAL, ModelScope.CUSTOMER)}
        self.when = datetime.now(UTC) - timedelta(days=20)

    def _artifact(self, scope: ModelScope) -> bytes:
        customer = self.customer_id if scope is ModelScope.CUSTOMER else ""
        record = self.registry.get_model(scope, customer, "v1")
        assert record is not None
        assert record.artifact is not None
        return record.artifact

    def store(self, scope: ModelScope, artifact: bytes, checksum: str) -> None:
        """Overwrite the stored artifact of v1 in ``scope`` and tell the servers (the generation moves)."""
        with self.database.session() as session:
            session.execute(
                update(MODELS)
                .where(MODELS.c.version == "v1", MODELS.c.scope == scope.value)
                .values(artifact=artifact, artifact_sha256=checksum)
            )
            session.execute(update(GENERATION).values(generation=GENERATION.c.generation + 1))
        # Past the refresh interval: the next call reads the generation again and reloads.
        time.sleep(REFRESH_SECONDS * 2)

    def score(self, client: posguard.Client | None = None) -> R.ScoreTransactionResponse:
        self.when += timedelta(minutes=11)
        answer: R.ScoreTransactionResponse = (client or self.client).score_transaction(
            transaction=_transaction(self.number, self.when)
        )
        return answer

    def failures(self, kind: str, server: RunningServer | None = None) -> float:
        registry = (server or self.server).server.metrics.registry
        return registry.get_sample_value("posguard_risk_model_load_failures_total", {"kind": kind}) or 0.0

    def degraded(self, server: RunningServer) -> float | None:
        return server.server.metrics.registry.get_sample_value(
            "posguard_degraded", {"component": "risk_model"}
        )


def health(server: RunningServer, service: str) -> int:
    with grpc.insecure_channel(server.target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return int(answer.status)


def wait_for_health(server: RunningServer, service: str, status: int) -> None:
    """Until ``service`` reports ``status`` (the server refreshes its models on its own, without calls)."""
    give_up = time.monotonic() + 30
    while health(server, service) != status:
        assert time.monotonic() < give_up, f"{service} never reported {status}"
        time.sleep(0.05)


def flipped(data: bytes, rng: random.Random) -> bytes:
    damaged = bytearray(data)
    damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
    return bytes(damaged)


def test_random_bit_flips_in_stored_artifacts_never_fail_a_score_and_keep_the_model_loaded(
    server_factory: Callable[..., RunningServer], database_url: str
) -> None:
    scene = Scene(server_factory, database_url)
    first = scene.score()
    assert (first.model.scope, first.model.version) == (R.MODEL_SCOPE_CUSTOMER, "v1")
    rng = random.Random(2024)
    for flip in range(FLIPS):
        scope = rng.choice((ModelScope.GLOBAL, ModelScope.CUSTOMER))
        intact = scene.intact[scope]
        damaged = flipped(intact, rng)
        # Most flips keep the registered checksum (damage after registration); some come with a checksum
        # of the damaged bytes (damage before it), which only loading itself can refuse.
        recomputed = rng.random() < 0.3
        kind = "global" if scope is ModelScope.GLOBAL else "customer"
        before = scene.failures(kind)
        scene.store(scope, damaged, artifact_digest(damaged if recomputed else intact))
        try:
            answer = scene.score()  # any error (INTERNAL, UNIMPLEMENTED, ...) fails the test here
        except posguard.PosguardError as error:
            raise AssertionError(f"flip {flip} in the {kind} model: {error.code} {error}") from error
        # The model loaded before keeps deciding: never the no-model answer, never a default approval.
        assert answer.model.scope != R.MODEL_SCOPE_NONE, (flip, kind, answer)
        assert answer.model.version == "v1"
        assert not {r.code for r in answer.reasons} & {"NO_MODEL", "NO_USABLE_MODEL"}
        if not recomputed:
            # The checksum refuses every damaged artifact, even one that would parse.
            assert scene.failures(kind) > before, (flip, kind)
            if scope is ModelScope.CUSTOMER:
                assert answer.model.scope == R.MODEL_SCOPE_GLOBAL  # the global model alone, as at cold start
        scene.store(scope, intact, artifact_digest(intact))
    assert health(scene.server, RISK) == SERVING
    assert scene.degraded(scene.server) == 0
    again = scene.score()
    assert (again.model.scope, again.model.version) == (R.MODEL_SCOPE_CUSTOMER, "v1")


@pytest.mark.parametrize("setting", ["review", "decline", "approve"])
def test_without_a_usable_model_the_answer_is_the_setting_and_health_says_so(
    server_factory: Callable[..., RunningServer], database_url: str, setting: str
) -> None:
    scene = Scene(server_factory, database_url)
    intact = scene.intact[ModelScope.GLOBAL]
    # The global model is damaged before this server ever loaded it (a start-up); the customer's is intact.
    scene.store(ModelScope.GLOBAL, flipped(intact, random.Random(setting)), artifact_digest(intact))
    server = scene.make(risk_no_model_decision=setting)
    assert health(server, RISK) == NOT_SERVING  # at once: the models are loaded before the server serves
    assert health(server, CUSTOMER_IDS) == SERVING
    assert health(server, "") == SERVING
    assert scene.degraded(server) == 1
    assert scene.failures("global", server) >= 1
    with posguard.Client(server.target, api_key=server.key("gateway"), timeout=10) as client:
        answer = scene.score(client)
        assert answer.decision == getattr(R, f"DECISION_{setting.upper()}")
        assert [r.code for r in answer.reasons] == ["NO_USABLE_MODEL"]
        assert "no usable model" in answer.reasons[0].message
        assert (answer.model.scope, answer.risk_score) == (R.MODEL_SCOPE_NONE, 0.0)

        # Mended (here: the bytes put back; in practice a rollback or a new promotion), without any call.
        scene.store(ModelScope.GLOBAL, intact, artifact_digest(intact))
        wait_for_health(server, RISK, SERVING)
        assert scene.degraded(server) == 0
        scored = scene.score(client)
        assert (scored.model.scope, scored.model.version) == (R.MODEL_SCOPE_CUSTOMER, "v1")


def test_no_model_active_yet_reviews_by_default_and_is_not_a_failure(
    server_factory: Callable[..., RunningServer], database_url: str
) -> None:
    upgrade(database_url)
    server = server_factory(database_url=database_url)
    with posguard.Client(server.target, api_key=server.key("gateway"), timeout=10) as client:
        number = client.issue_customer_id().customer.primary.number
        answer = client.score_transaction(transaction=_transaction(number, datetime.now(UTC)))
    assert answer.decision == R.DECISION_REVIEW
    assert [r.code for r in answer.reasons] == ["NO_MODEL"]
    assert health(server, RISK) == SERVING
    assert (
        server.server.metrics.registry.get_sample_value("posguard_degraded", {"component": "risk_model"}) == 0
    )
    with server.server.database.session(read_only=True) as session:
        assert session.scalar(select(MODELS.c.id).limit(1)) is None
