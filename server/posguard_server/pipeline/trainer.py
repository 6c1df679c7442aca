"""Train global and per-customer models from stored history and register (and activate) them.

One training run has one version string shared by the global model and every customer model it produced;
activation of the whole set is one registry transaction, so servers never combine a new global model with
half of the new customer models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from posguard_models.features import place_key
from posguard_models.model import GlobalModel
from posguard_models.retraining import CustomerFit
from posguard_models.training import History, Trained, TrainingConfig, train
from posguard_server.domain.currencies import minor_exponent
from posguard_server.domain.risk import ModelScope, NewModel, Outcome
from posguard_server.store.history import SqlHistoryStore
from posguard_server.store.model_registry import SqlModelRegistry

FRAUD_OUTCOMES = frozenset({Outcome.FRAUD, Outcome.CHARGEBACK})


@dataclass(frozen=True, slots=True)
class TrainReport:
    version: str
    rows: int
    customers: int
    customer_models: int
    labelled_fraud: int
    activated: bool
    metrics: dict[str, float]


def load_history(store: SqlHistoryStore, *, until: datetime | None = None) -> History:
    """All stored history (labelled fraud included: it shapes features; training leaves it out)."""
    customers: list[str] = []
    times: list[float] = []
    amounts: list[float] = []
    keys: list[str] = []
    latitudes: list[float] = []
    longitudes: list[float] = []
    fraud: list[bool] = []
    label_times: list[float] = []
    for batch in store.history(until=until, exclude_labelled_fraud=False):
        for i in range(len(batch)):
            customers.append(batch.customer_ids[i])
            times.append(batch.event_times[i].timestamp())
            exponent = minor_exponent(batch.currencies[i]) or 0
            amounts.append(batch.amounts_minor[i] / 10**exponent)
            keys.append(place_key(batch.terminal_ids[i], batch.merchant_ids[i]))
            latitude, longitude = batch.latitudes[i], batch.longitudes[i]
            latitudes.append(np.nan if latitude is None else latitude)
            longitudes.append(np.nan if longitude is None else longitude)
            outcome = batch.outcomes[i]
            labelled_at = batch.outcome_ats[i]
            is_fraud = outcome in FRAUD_OUTCOMES and labelled_at is not None
            fraud.append(is_fraud)
            label_times.append(labelled_at.timestamp() if is_fraud and labelled_at is not None else np.nan)
    return History(
        customers=np.array(customers, dtype=object),
        times=np.array(times, dtype=np.float64),
        amounts=np.array(amounts, dtype=np.float64),
        keys=np.array(keys, dtype=object),
        fraud=np.array(fraud, dtype=np.bool_),
        label_times=np.array(label_times, dtype=np.float64),
        latitudes=np.array(latitudes, dtype=np.float64),
        longitudes=np.array(longitudes, dtype=np.float64),
    )


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def run_models(
    version: str,
    *,
    global_model: GlobalModel | None,
    global_window: tuple[float, float],
    global_samples: int,
    global_metrics: Mapping[str, float],
    customers: Sequence[CustomerFit],
    customer_metrics: Mapping[str, float],
) -> list[NewModel]:
    """The registry rows of one training run: its global model (if it trained one) and its customer models."""
    now = datetime.now(UTC)
    models: list[NewModel] = []
    if global_model is not None:
        models.append(
            NewModel(
                scope=ModelScope.GLOBAL,
                customer_id="",
                version=version,
                created_at=now,
                training_window_start=_utc(global_window[0]),
                training_window_end=_utc(global_window[1]),
                sample_count=global_samples,
                metrics=global_metrics,
                artifact=global_model.to_bytes(),
            )
        )
    models += [
        NewModel(
            scope=ModelScope.CUSTOMER,
            customer_id=fit.customer,
            version=version,
            created_at=now,
            training_window_start=_utc(fit.window_start),
            training_window_end=_utc(fit.window_end),
            sample_count=fit.sample_count,
            metrics=customer_metrics,
            artifact=fit.artifact,
        )
        for fit in customers
    ]
    return models


def register(
    registry: SqlModelRegistry, trained: Trained, *, version: str, activate: bool, actor: str
) -> None:
    models = run_models(
        version,
        global_model=trained.global_model,
        global_window=(trained.window_start, trained.window_end),
        global_samples=trained.sample_count,
        global_metrics=trained.metrics,
        customers=[
            CustomerFit(m.customer, m.forest.to_bytes(), m.sample_count, m.window_start, m.window_end)
            for m in trained.customer_models
        ],
        customer_metrics={},
    )
    registry.add_models(models)
    if activate:
        registry.activate_many(
            [(m.scope, m.customer_id, m.version) for m in models],
            now=models[0].created_at,
            actor=actor,
            reason="trained",
        )


def train_and_register(
    history_store: SqlHistoryStore,
    registry: SqlModelRegistry,
    config: TrainingConfig,
    *,
    activate: bool = True,
    actor: str = "cli",
    until: datetime | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TrainReport:
    history = load_history(history_store, until=until)
    trained = train(history, config, progress=progress)
    version = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") + f"-s{config.seed}"
    register(registry, trained, version=version, activate=activate, actor=actor)
    return TrainReport(
        version=version,
        rows=len(history.times),
        customers=len(set(history.customers.tolist())),
        customer_models=len(trained.customer_models),
        labelled_fraud=int(history.fraud.sum()),
        activated=activate,
        metrics=trained.metrics,
    )
