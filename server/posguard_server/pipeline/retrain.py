"""Nightly retraining: incremental, on a process pool or a Dask cluster, evaluated, and promoted safely.

A run:

1. reads the stored history and holds out its last ``holdout_days`` (by event time) for evaluation: every
   forest, the calibration and the label feedback learn only from the rows before;
2. picks the customers to retrain: by default those without a model, or with at least ``min_new`` new usable
   transactions since their model's training window ended (``since`` moves that point to a date); the global
   model is retrained when there is none, or when the rows since its window reach ``global_change`` of its
   sample count, or with ``everyone``;
3. fits the customer forests in chunks on a process pool or a Dask cluster. Workers only return artifacts;
   this process writes them, all in one registry transaction, after every chunk came back, so a worker that
   dies mid-run (Dask runs its chunk again elsewhere) leaves no model lost or half-written;
4. scores the held-out transactions with the candidate set and with the active models, on labelled outcomes
   (reported fraud or chargeback is positive, everything else negative), stores the comparison with every
   model of the run, and promotes the run only when the candidate is not worse (``promotion_refusal``), or
   puts it in shadow, or leaves it a candidate.

Customer forests share one score scale (isolation-forest path lengths normalised by their own sample size),
so a run that retrains some customers but not the global model keeps the global model's calibration. A run
that retrains the global model recalibrates on the blend of the whole set it will serve with.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from posguard_models.evaluation import detection
from posguard_models.forest import CompiledForest
from posguard_models.model import GlobalModel
from posguard_models.retraining import (
    CustomerFit,
    CustomerForest,
    CustomerJob,
    ModelSet,
    blended_raw,
    fit_customers,
    set_risk,
)
from posguard_models.training import (
    DAY,
    History,
    TrainingConfig,
    customer_spans,
    fit_global_forest,
    global_model,
    usable_rows,
)
from posguard_server.domain.errors import FailedPrecondition
from posguard_server.domain.risk import (
    METRIC_AP,
    METRIC_BASELINE_AP,
    METRIC_BASELINE_RECALL,
    METRIC_BASELINE_ROC_AUC,
    METRIC_EVALUATED_AT,
    METRIC_EVALUATED_FRAUD,
    METRIC_EVALUATED_ROWS,
    METRIC_RECALL,
    METRIC_ROC_AUC,
    ModelRecord,
    ModelScope,
    ModelStatus,
)
from posguard_server.pipeline.report import ReportInput, ScoredSet, ShadowScores, Standing
from posguard_server.pipeline.trainer import load_history, run_models
from posguard_server.store.history import SqlHistoryStore
from posguard_server.store.model_registry import SqlModelRegistry
from posguard_server.store.shadow import SqlShadowStore

# Stored with every model of a run next to the comparison: where the held-out window began and ended.
METRIC_EVALUATION_START = "evaluation_window_start"
METRIC_EVALUATION_END = "evaluation_window_end"


class PromotionMode(Enum):
    AUTO = "auto"  # promote when the candidate is not worse than the active models
    FORCE = "force"  # promote whatever the comparison says (recorded as forced)
    SHADOW = "shadow"  # run next to the active models, answer with the active ones
    NEVER = "never"  # leave the run a candidate


@dataclass(frozen=True, slots=True)
class RetrainOptions:
    config: TrainingConfig = field(default_factory=TrainingConfig)
    everyone: bool = False  # --all: every customer with enough history, and the global model
    customers: frozenset[str] | None = None  # only these customers (and no global model unless --all)
    since: datetime | None = None  # count new history from here instead of each model's window end
    min_new: int = 20
    global_change: float = 0.10
    holdout_days: float = 7.0
    jobs: int = 1
    dask_scheduler: str | None = None
    chunk_size: int = 16
    promotion: PromotionMode = PromotionMode.AUTO
    actor: str = "cli"


@dataclass(frozen=True, slots=True)
class Evaluated:
    """The held-out rows, their labels, and the risk of each under the candidate and the active models."""

    window_start: datetime | None
    window_end: datetime | None
    fraud: npt.NDArray[np.bool_]
    candidate: npt.NDArray[np.float64]
    active: npt.NDArray[np.float64] | None
    metrics: dict[str, float]
    active_version: str = ""  # the active global model's version when the comparison was made
    # What the evaluated run is in the registry now, and since when (None where the registry cannot say).
    standing: Standing = Standing.CANDIDATE
    standing_since: datetime | None = None

    def report(
        self,
        version: str,
        *,
        review: float,
        decline: float,
        summary: Sequence[tuple[str, str]] = (),
        shadow: ShadowScores | None = None,
    ) -> ReportInput:
        """What the evaluation report shows of this comparison."""
        if len(self.candidate) == 0:
            raise ValueError("no held-out transactions to report on (retrain with --holdout-days above 0)")
        return ReportInput(
            title=f"posguard retraining run {version}",
            generated_at=datetime.now(UTC),
            window_start=self.window_start,
            window_end=self.window_end,
            fraud=self.fraud,
            candidate=ScoredSet(self.standing.value, version, self.candidate),
            active=ScoredSet("active", self.active_version, self.active) if self.active is not None else None,
            review_threshold=review,
            decline_threshold=decline,
            summary=summary,
            shadow=shadow,
            standing=self.standing,
            standing_since=self.standing_since,
        )


@dataclass(slots=True)
class RetrainResult:
    version: str  # "" when nothing was trained
    trained: int
    skipped: collections.Counter[str]
    global_trained: bool
    global_reason: str
    seconds: float
    fit_seconds: float
    artifact_bytes: list[int]
    evaluation: Evaluated | None
    promotion: str  # what happened: promoted, refused and why, shadow, candidate

    @property
    def models_per_second(self) -> float:
        return self.trained / self.fit_seconds if self.fit_seconds > 0 else 0.0

    def summary(self) -> list[tuple[str, str]]:
        lines = [
            ("version", self.version or "(nothing trained)"),
            ("customer models trained", str(self.trained)),
        ]
        lines += [(f"skipped: {reason}", str(count)) for reason, count in sorted(self.skipped.items())]
        lines += [
            ("global model", ("trained: " if self.global_trained else "kept: ") + self.global_reason),
            ("time", f"{self.seconds:.1f} s"),
            ("customer models per second", f"{self.models_per_second:.1f}"),
        ]
        if self.artifact_bytes:
            lines.append(
                (
                    "bytes per customer model",
                    f"median {int(np.median(self.artifact_bytes)):,}, max {max(self.artifact_bytes):,}",
                )
            )
        if self.evaluation is not None:
            m = self.evaluation.metrics
            if METRIC_AP in m:
                base = f", active {m[METRIC_BASELINE_AP]:.4f}" if METRIC_BASELINE_AP in m else ""
                lines.append(("average precision on held-out labels", f"candidate {m[METRIC_AP]:.4f}{base}"))
            else:
                lines.append(("evaluation", "no labelled fraud among the held-out transactions"))
        lines.append(("promotion", self.promotion))
        return lines


class Progress(Protocol):
    """Where a run reports fitted customers: the CLI's tqdm bar (rate and ETA), or nothing."""

    def update(self, n: int) -> object: ...

    def close(self) -> None: ...


# Called with the number of customers to fit, before the first is fitted.
ProgressFactory = Callable[[int], Progress]


class _Quiet:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


# -- the run --------------------------------------------------------------------------------------------


def retrain(
    history_store: SqlHistoryStore,
    registry: SqlModelRegistry,
    shadow: SqlShadowStore,
    options: RetrainOptions,
    *,
    progress: ProgressFactory | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> RetrainResult:
    started = time.perf_counter()
    evaluated_at = time.time()  # before the active models are read: a promotion after it makes this stale
    history = load_history(history_store)
    if len(history.times) == 0:
        raise ValueError("no history to train on")
    X = history.features()  # noqa: N806 - matrix
    cutoff = _cutoff(history, options.holdout_days)
    usable = usable_rows(history, until=cutoff)
    if not usable.any():
        raise ValueError("no usable history before the held-out days: lower --holdout-days")
    window = history.times < cutoff if cutoff is not None else np.ones(len(history.times), dtype=np.bool_)
    held_out = ~window

    active_global = registry.active_model(ModelScope.GLOBAL, "")
    active_customers = {r.customer_id: r for r in registry.active_models(ModelScope.CUSTOMER)}
    active_set = _active_set(active_global, active_customers)
    jobs, skipped = _select_customers(history, X, usable, active_customers, options)
    retrain_global, global_reason = _global_decision(history, usable, active_global, active_set, options)
    if not jobs and not retrain_global:
        return RetrainResult(
            version="",
            trained=0,
            skipped=skipped,
            global_trained=False,
            global_reason=global_reason,
            seconds=time.perf_counter() - started,
            fit_seconds=0.0,
            artifact_bytes=[],
            evaluation=None,
            promotion="nothing new",
        )

    fit_started = time.perf_counter()
    fits = fit_jobs(jobs, options, progress=progress, on_chunk=on_chunk)
    fit_seconds = time.perf_counter() - fit_started

    candidate_customers = dict(active_set.customers) if active_set is not None else {}
    for fit in fits:
        candidate_customers[fit.customer] = CustomerForest(
            CompiledForest.from_bytes(fit.artifact), fit.sample_count
        )
    global_metrics: dict[str, float] = {}
    if retrain_global:
        forest = fit_global_forest(history, X, usable, options.config)
        everything = np.ones(len(X), dtype=np.bool_)
        raw = blended_raw(history, X, everything, forest, candidate_customers, options.config.combine_n0)
        candidate_global = global_model(
            history, X, usable, window, raw, forest, options.config, global_metrics
        )
    else:
        assert active_set is not None  # the global model is retrained whenever none is active
        candidate_global = active_set.global_model
    candidate = ModelSet(candidate_global, candidate_customers)

    evaluation = evaluate_sets(
        history, X, held_out, candidate, active_set, active_global.version if active_global else ""
    )
    evaluation.metrics[METRIC_EVALUATED_AT] = evaluated_at
    version = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") + f"-s{options.config.seed}"
    _register(
        registry,
        version,
        history,
        usable,
        fits,
        candidate_global if retrain_global else None,
        global_metrics,
        evaluation.metrics,
    )
    outcome = _promote(registry, shadow, version, options)
    return RetrainResult(
        version=version,
        trained=len(fits),
        skipped=skipped,
        global_trained=retrain_global,
        global_reason=global_reason,
        seconds=time.perf_counter() - started,
        fit_seconds=fit_seconds,
        artifact_bytes=[len(f.artifact) for f in fits],
        evaluation=evaluation,
        promotion=outcome,
    )


def _cutoff(history: History, holdout_days: float) -> float | None:
    if holdout_days <= 0:
        return None
    return float(history.times.max()) - holdout_days * DAY


# -- what to train --------------------------------------------------------------------------------------


def _select_customers(
    history: History,
    X: npt.NDArray[np.float64],  # noqa: N803 - matrix
    usable: npt.NDArray[np.bool_],
    active: dict[str, ModelRecord],
    options: RetrainOptions,
) -> tuple[list[CustomerJob], collections.Counter[str]]:
    jobs: list[CustomerJob] = []
    skipped: collections.Counter[str] = collections.Counter()
    since = options.since.timestamp() if options.since is not None else None
    for start, end in customer_spans(history.customers):
        customer = str(history.customers[start])
        if options.customers is not None and customer not in options.customers:
            skipped["not asked for"] += 1
            continue
        rows = np.flatnonzero(usable[start:end]) + start
        if len(rows) < options.config.customer_min_history:
            skipped[f"under {options.config.customer_min_history} transactions of history"] += 1
            continue
        model = active.get(customer)
        if not options.everyone and options.customers is None and model is not None:
            counted_from = since if since is not None else model.training_window_end.timestamp()
            new = int((history.times[rows] > counted_from).sum())
            if new < options.min_new:
                skipped[f"under {options.min_new} new transactions since the last model"] += 1
                continue
        jobs.append(CustomerJob(customer, X[rows], history.times[rows]))
    return jobs, skipped


def _global_decision(
    history: History,
    usable: npt.NDArray[np.bool_],
    active: ModelRecord | None,
    active_set: ModelSet | None,
    options: RetrainOptions,
) -> tuple[bool, str]:
    if active is None:
        return True, "no global model was active"
    if active_set is None:
        return True, "the active global model cannot be read by this version"
    if options.everyone:
        return True, "--all"
    if options.customers is not None:
        return False, "only the customers asked for"
    new = int((history.times[usable] > active.training_window_end.timestamp()).sum())
    share = new / max(1, active.sample_count)
    growth = f"{new} new transactions, {share:.0%} of its {active.sample_count}"
    if share >= options.global_change:
        return True, growth
    return False, f"{growth}, under {options.global_change:.0%}"


# -- fitting, here or elsewhere -------------------------------------------------------------------------


def _chunks(jobs: Sequence[CustomerJob], size: int) -> list[list[CustomerJob]]:
    return [list(jobs[i : i + size]) for i in range(0, len(jobs), size)]


def fit_jobs(
    jobs: Sequence[CustomerJob],
    options: RetrainOptions,
    *,
    progress: ProgressFactory | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> list[CustomerFit]:
    """Fit every job here, on a process pool (``jobs`` > 1) or on Dask; sorted by customer."""
    bar: Progress = progress(len(jobs)) if progress is not None else _Quiet()
    fits: list[CustomerFit] = []
    try:
        for done, chunk in enumerate(_fitted_chunks(_chunks(jobs, options.chunk_size), options)):
            fits.extend(chunk)
            bar.update(len(chunk))
            if on_chunk is not None:
                on_chunk(done + 1)
    finally:
        bar.close()
    # Chunks come back in completion order; the registry gets them in one order whatever ran them.
    fits.sort(key=lambda fit: fit.customer)
    return fits


def _fitted_chunks(chunks: list[list[CustomerJob]], options: RetrainOptions) -> Iterator[list[CustomerFit]]:
    config = options.config
    if not chunks:
        return
    if options.dask_scheduler:
        yield from _dask_chunks(chunks, config, options.dask_scheduler)
    elif options.jobs > 1:
        from joblib import Parallel, delayed

        parallel = Parallel(n_jobs=options.jobs, return_as="generator_unordered")
        yield from parallel(delayed(fit_customers)(chunk, config) for chunk in chunks)
    else:
        for chunk in chunks:
            yield fit_customers(chunk, config)


def _dask_chunks(chunks: list[list[CustomerJob]], config: TrainingConfig, address: str) -> Iterator[Any]:
    from distributed import Client, as_completed

    try:
        client = Client(address, timeout="30s")  # type: ignore[no-untyped-call]
    except (OSError, TimeoutError) as error:
        raise ValueError(f"cannot reach the Dask scheduler at {address}: {error}") from error
    with client:
        # Chunks are plain data and fit_customers is pure: a chunk whose worker died is run again elsewhere
        # (the scheduler's allowed-failures), and nothing is written until every chunk is back here.
        futures = [client.submit(fit_customers, chunk, config, pure=False, retries=2) for chunk in chunks]
        for future in as_completed(futures):  # type: ignore[no-untyped-call]
            yield future.result()


# -- model sets and evaluation --------------------------------------------------------------------------


def _active_set(active_global: ModelRecord | None, customers: dict[str, ModelRecord]) -> ModelSet | None:
    if active_global is None or active_global.artifact is None:
        return None
    try:
        model = GlobalModel.from_bytes(active_global.verified_artifact())
    except ValueError:
        return None
    forests: dict[str, CustomerForest] = {}
    for customer, record in customers.items():
        if record.artifact is None:
            continue
        try:
            forests[customer] = CustomerForest(
                CompiledForest.from_bytes(record.verified_artifact()), record.sample_count
            )
        except ValueError:
            continue  # a server scores this customer with the global model alone; so does the comparison
    return ModelSet(model, forests)


def evaluate_sets(
    history: History,
    X: npt.NDArray[np.float64],  # noqa: N803 - matrix
    rows: npt.NDArray[np.bool_],
    candidate: ModelSet,
    active: ModelSet | None,
    active_version: str = "",
) -> Evaluated:
    """Risk of the selected rows under both sets, and the comparison on their labels when there are some."""
    fraud = history.fraud[rows]
    if not rows.any():
        return Evaluated(None, None, fraud, np.zeros(0), None, {METRIC_EVALUATED_ROWS: 0.0}, active_version)
    candidate_risk = set_risk(history, X, rows, candidate)
    active_risk = set_risk(history, X, rows, active) if active is not None else None
    times = history.times[rows]
    metrics: dict[str, float] = {
        METRIC_EVALUATED_ROWS: float(rows.sum()),
        METRIC_EVALUATED_FRAUD: float(fraud.sum()),
        METRIC_EVALUATION_START: float(times.min()),
        METRIC_EVALUATION_END: float(times.max()),
    }
    if fraud.any() and not fraud.all():
        found = detection(fraud, candidate_risk)
        metrics.update(
            {
                METRIC_AP: found.average_precision,
                METRIC_ROC_AUC: found.roc_auc,
                METRIC_RECALL: found.recall_at_alert_rate,
            }
        )
        if active_risk is not None:
            base = detection(fraud, active_risk)
            metrics.update(
                {
                    METRIC_BASELINE_AP: base.average_precision,
                    METRIC_BASELINE_ROC_AUC: base.roc_auc,
                    METRIC_BASELINE_RECALL: base.recall_at_alert_rate,
                }
            )
    return Evaluated(
        datetime.fromtimestamp(float(times.min()), UTC),
        datetime.fromtimestamp(float(times.max()), UTC),
        fraud,
        candidate_risk,
        active_risk,
        metrics,
        active_version,
    )


# -- registry -------------------------------------------------------------------------------------------


def _register(
    registry: SqlModelRegistry,
    version: str,
    history: History,
    usable: npt.NDArray[np.bool_],
    fits: Sequence[CustomerFit],
    new_global: GlobalModel | None,
    global_metrics: dict[str, float],
    evaluation: dict[str, float],
) -> None:
    times = history.times[usable]
    registry.add_models(
        run_models(
            version,
            global_model=new_global,
            global_window=(float(times.min()), float(times.max())),
            global_samples=int(usable.sum()),
            global_metrics={**global_metrics, "customer_models": float(len(fits)), **evaluation},
            customers=fits,
            # The run-level comparison goes with every model: promotion judges any of them by it.
            customer_metrics=evaluation,
        )
    )


def _promote(
    registry: SqlModelRegistry, shadow: SqlShadowStore, version: str, options: RetrainOptions
) -> str:
    now = datetime.now(UTC)
    if options.promotion is PromotionMode.NEVER:
        return "left as a candidate (--no-promote)"
    if options.promotion is PromotionMode.SHADOW:
        count = shadow.set_shadow(version, now=now, actor=options.actor, reason="retrain --shadow")
        return f"in shadow ({count} models)"
    force = options.promotion is PromotionMode.FORCE
    try:
        registry.promote(
            ModelScope.GLOBAL,
            "",
            version,
            force=force,
            now=now,
            actor=options.actor,
            reason="retrain --force" if force else "retrain: not worse than the active models",
        )
    except FailedPrecondition as refused:
        return f"refused, left as a candidate: {refused.message}"
    return "promoted (forced)" if force else "promoted"


# -- evaluating a stored run again (the report) ---------------------------------------------------------


def evaluate_run(history_store: SqlHistoryStore, registry: SqlModelRegistry, version: str) -> Evaluated:
    """Compare a registered run with the models active now, on the held-out window its retrain used.

    The candidate set is the run's models over the active ones (a run that kept the global model, or
    retrained only some customers, is compared like for like). Without a stored window (a run of
    ``posguard-server train``), the last 7 days of history are used.
    """
    run, cursor = registry.list_models(version=version, limit=1000)
    while cursor is not None:
        page, cursor = registry.list_models(version=version, limit=1000, after_id=cursor)
        run += page
    if not run:
        raise ValueError(f"no model has version {version}")
    metrics = run[0].metrics
    history = load_history(history_store)
    if len(history.times) == 0:
        raise ValueError("no history to evaluate on")
    X = history.features()  # noqa: N806 - matrix
    start = metrics.get(METRIC_EVALUATION_START, float(history.times.max()) - 7 * DAY)
    end = metrics.get(METRIC_EVALUATION_END, float(history.times.max()))
    rows = (history.times >= start) & (history.times <= end)

    active_customers = {r.customer_id: r for r in registry.active_models(ModelScope.CUSTOMER)}
    active_global = registry.active_model(ModelScope.GLOBAL, "")
    active = _active_set(active_global, active_customers)
    forests = dict(active.customers) if active is not None else {}
    candidate_global = active.global_model if active is not None else None
    for model in run:
        record = registry.get_model(model.scope, model.customer_id, version)
        if record is None or record.artifact is None:
            continue
        if model.scope is ModelScope.GLOBAL:
            candidate_global = GlobalModel.from_bytes(record.verified_artifact())
        else:
            forests[model.customer_id] = CustomerForest(
                CompiledForest.from_bytes(record.verified_artifact()), record.sample_count
            )
    if candidate_global is None:
        raise ValueError("the run has no global model and none is active to score it with")
    evaluated = evaluate_sets(
        history,
        X,
        rows,
        ModelSet(candidate_global, forests),
        active,
        active_global.version if active_global else "",
    )
    standing, since = _standing(registry, version, run)
    return replace(evaluated, standing=standing, standing_since=since)


def _standing(
    registry: SqlModelRegistry, version: str, run: Sequence[ModelRecord]
) -> tuple[Standing, datetime | None]:
    """Where a run stands now, so its report does not call a promoted or rolled-back run the candidate.

    A run with any model active is active (a customer-scope rollback of some of its models leaves it so);
    one with none active or in shadow but retired models was rolled back, or replaced by a later run.
    """
    statuses = {model.status for model in run}
    if ModelStatus.ACTIVE in statuses:
        # The GLOBAL model's promotion is the run's; a customer-only run's models were promoted together.
        active = [m for m in run if m.status is ModelStatus.ACTIVE and m.activated_at is not None]
        head = next((m for m in active if m.scope is ModelScope.GLOBAL), None)
        times = [m.activated_at for m in ([head] if head is not None else active) if m.activated_at]
        return Standing.ACTIVE, min(times) if times else None
    if ModelStatus.SHADOW in statuses:
        return Standing.SHADOW, None  # the registry keeps no time for it
    if ModelStatus.RETIRED in statuses:
        rolled_back = registry.rolled_back_at(version)
        if rolled_back is not None:
            return Standing.ROLLED_BACK, rolled_back
        return Standing.RETIRED, None
    return Standing.CANDIDATE, None


def live_shadow_scores(shadow: SqlShadowStore, version: str) -> ShadowScores | None:
    """What servers scored with a run while it was in shadow, for the report (None if it never was)."""
    pairs = shadow.shadow_pairs(version)
    if not pairs.transaction_ids:
        return None
    return ShadowScores(
        version=version,
        active_risk=np.array(pairs.active_scores, dtype=np.float64),
        shadow_risk=np.array(pairs.shadow_scores, dtype=np.float64),
        fraud=np.array(pairs.fraud, dtype=np.bool_),
    )
