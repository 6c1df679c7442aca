"""The evaluation protocol, end to end, through the real service.

For each seed, on a fresh database: import the history days, (optionally) the outcomes known by the end of
history, train and activate; then start a real server on loopback and replay the later days in time order
through ``ScoreTransactions``, as a gateway would (history keeps growing), reporting each fraud with
``ReportOutcome`` once the replay clock passes its label delay when label feedback is on. Metrics are taken
over the test days: AP, ROC-AUC and recall at a 1% alert rate, overall and per fraud scenario.

Days are counted from the first transaction's UTC date: history is the first 60%, then a 10% gap (replayed,
not measured), then the last 30% measured.

By default the protocol is computed directly, with the server's own pieces and no server: rows the service's
request validation would refuse are left out, the models are trained in memory by the same ``train`` that
``posguard-server train`` runs, every row's features come from ``batch_features`` over each customer's stored
rows (history, then what the replay stores), which a test holds equal to the profile the server advances, and
the scores from the compiled forests in batches with ``set_risk``, as a server combines them. The answers are
the server's bit for bit (a test compares both ways on the sample data); ``through_server`` runs the replay
through a real server instead, some six times slower.
"""

from __future__ import annotations

import asyncio
import heapq
import operator
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

from posguard.aio import Client
from posguard.v1 import common_pb2, risk_pb2
from posguard_models.evaluation import Detection, Resolution, by_scenario, detection, resolution
from posguard_models.features import batch_features, place_key
from posguard_models.retraining import CustomerForest, ModelSet, set_risk
from posguard_models.training import History, TrainingConfig, train

# The servicer's own request validation, so a row is refused here exactly when the service refuses it.
from posguard_server.api.risk import _check_transaction, stream_error
from posguard_server.api.validation import Checker
from posguard_server.config import Settings
from posguard_server.domain.currencies import minor_exponent
from posguard_server.domain.errors import InvalidArgument
from posguard_server.domain.numbering import Numbering
from posguard_server.domain.policy import Policy, Rule
from posguard_server.domain.risk import Outcome, TransactionSource, event_time_refusal
from posguard_server.issuers import build_numbering
from posguard_server.pipeline.importer import DEFAULT_NAMESPACE, CsvTransaction, Importer, read_transactions
from posguard_server.pipeline.trainer import train_and_register
from posguard_server.scoring import Thresholds
from posguard_server.services.backtest import DayCounts, replay
from posguard_server.store.db import Database
from posguard_server.store.history import SqlHistoryStore
from posguard_server.store.migrate import upgrade
from posguard_server.store.model_registry import SqlModelRegistry
from posguard_server.store.policy import ReplayRow

HISTORY_SHARE = 0.6
TEST_SHARE = 0.3
STREAM_TIMEOUT = 7 * 24 * 3600.0
Progress = Callable[[str, int, int], None]

_CHANNELS = {
    "pos": common_pb2.CHANNEL_POS,
    "online": common_pb2.CHANNEL_ONLINE,
    "mobile": common_pb2.CHANNEL_MOBILE,
}


@dataclass(frozen=True, slots=True)
class Split:
    days: int
    history_days: int  # days [0, history_days) are history
    test_start: int  # days [test_start, days) are measured

    @classmethod
    def of(cls, days: int) -> Split:
        return cls(days, round(days * HISTORY_SHARE), days - round(days * TEST_SHARE))


@dataclass(slots=True)
class SeedResult:
    seed: int
    overall: Detection
    scenarios: dict[int, Detection]
    scored: int
    refused: int
    outcomes_reported: int
    resolution: Resolution
    refusals: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    training: dict[str, float] = field(default_factory=dict)
    rules: DayCounts | None = None  # what the rules given to ``evaluate`` did over the test days
    # The model's risk score of each replayed row, by its index in the dataset (for the rules' effect).
    scores: dict[int, float] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            **self.overall.as_dict(),
            "scenarios": {str(k): v.as_dict() for k, v in self.scenarios.items()},
            "scored": self.scored,
            "refused": self.refused,
            "refusals": self.refusals,
            "outcomes_reported": self.outcomes_reported,
            "calibration": self.resolution.as_dict(),
            "seconds": self.seconds,
            "training": self.training,
            **({"rules": self.rules.counts()} if self.rules is not None else {}),
        }


@dataclass(slots=True)
class Evaluation:
    dataset: str
    labels: bool
    split: Split
    seeds: list[SeedResult]

    def mean(self) -> dict[str, float]:
        keys = ("ap", "roc_auc", "recall_at_1pct")
        out = {k: float(np.mean([s.overall.as_dict()[k] for s in self.seeds])) for k in keys}
        out.update({f"{k}_std": float(np.std([s.overall.as_dict()[k] for s in self.seeds])) for k in keys})
        scenarios = sorted({k for s in self.seeds for k in s.scenarios})
        for k in scenarios:
            values = [s.scenarios[k] for s in self.seeds if k in s.scenarios]
            out[f"scenario_{k}_ap"] = float(np.mean([v.average_precision for v in values]))
            out[f"scenario_{k}_recall_at_1pct"] = float(np.mean([v.recall_at_alert_rate for v in values]))
        for key in self.seeds[0].resolution.as_dict() if self.seeds else ():
            out[key] = float(np.mean([s.resolution.as_dict()[key] for s in self.seeds]))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "labels": self.labels,
            "split": {
                "days": self.split.days,
                "history_days": self.split.history_days,
                "test_start_day": self.split.test_start,
            },
            "mean": self.mean(),
            "seeds": [s.as_dict() for s in self.seeds],
        }


def load_rows(path: Path, *, customers_limit: int | None = None) -> list[CsvTransaction]:
    """The file's rows in time order; with ``customers_limit``, only that many customers (first refs)."""
    rows = list(read_transactions(path))
    if customers_limit is not None:
        keep = set(sorted({r.customer_ref for r in rows})[:customers_limit])
        rows = [r for r in rows if r.customer_ref in keep]
    rows.sort(key=lambda r: (r.transaction.event_time, r.line))
    return rows


def evaluate(
    path: Path,
    *,
    seeds: Sequence[int],
    labels: bool,
    label_delay_days: float = 7.0,
    customers_limit: int | None = None,
    training: TrainingConfig | None = None,
    work_dir: Path | None = None,
    progress: Progress | None = None,
    through_server: bool = False,
    jobs: int = 1,
    on_seed: Callable[[SeedResult], None] | None = None,
    rules: Sequence[Rule] = (),
    thresholds: Thresholds | None = None,
    time_zone: str | None = None,
) -> Evaluation:
    """The protocol on ``path``, once per seed; ``jobs`` processes fit the customer forests (direct only).

    ``on_seed`` gets each seed's result as soon as it is measured (a run of several seeds takes hours).
    With ``rules``, each seed also reports what they would have done over the test days on top of the
    model's decisions (``services.backtest``: the same replay as ``posguard-server rules backtest``, with
    the dataset's fraud labels), the model deciding by ``thresholds`` and the rules reading local times in
    ``time_zone`` (by default, the server's default settings).
    """
    rows = load_rows(path, customers_limit=customers_limit)
    if not rows:
        raise ValueError(f"{path.name} has no transactions")
    start = rows[0].transaction.event_time.date()
    day = [(r.transaction.event_time.date() - start).days for r in rows]
    split = Split.of(day[-1] + 1)
    delay = timedelta(days=label_delay_days)
    results = []
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="posguard-eval-") as tmp:
        stored = None if through_server else _stored_rows(rows, day, split, labels, delay, Path(tmp))
        for seed in seeds:
            config = training or TrainingConfig()
            config = TrainingConfig(**{**_fields(config), "seed": seed})
            if stored is not None:
                result = _score_seed(stored, config, jobs, progress)
            else:
                with tempfile.TemporaryDirectory(dir=tmp, prefix="seed-") as seed_dir:
                    result = _run_seed(rows, day, split, config, labels, delay, Path(seed_dir), progress)
            if rules:
                result.rules = _rules_effect(
                    rows, day, split, result.scores, rules, thresholds or _DEFAULT_THRESHOLDS, time_zone
                )
            results.append(result)
            if on_seed is not None:
                on_seed(result)
    return Evaluation(path.name.split(".")[0], labels, split, results)


def _fields(config: TrainingConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class _Stored:
    """The rows a replay leaves stored, as columns grouped by customer (time order, then file order).

    ``history`` is what training reads back from the store; ``everything`` adds the replayed rows the server
    accepted, with the place key the server counts label feedback at and the labels as reported by the time
    each row is scored. ``replayed`` marks those rows and ``index`` gives their index in the replay.
    """

    history: History
    everything: History
    replayed: npt.NDArray[np.bool_]
    index: npt.NDArray[np.int64]
    row: npt.NDArray[np.int64]  # each position's index in the dataset's rows
    measured: npt.NDArray[np.bool_]
    fraud: npt.NDArray[np.bool_]
    scenario: npt.NDArray[np.int64]
    refusals: dict[str, int]
    outcomes_reported: int
    seconds: float
    places: npt.NDArray[np.object_]  # the place key of each row of ``everything``, as its profile sees it


def _stored_rows(
    rows: list[CsvTransaction], day: list[int], split: Split, labels: bool, delay: timedelta, tmp: Path
) -> _Stored:
    clock = time.perf_counter()
    now = datetime.now(UTC)
    numbering = build_numbering(Settings(data_dir=tmp, insecure_no_auth=True))
    refusals: dict[str, int] = {}
    trained_at = rows[0].transaction.event_time
    kept: list[tuple[int, int]] = []  # (row, replay index or -1 for history)
    replay_index = 0
    for i, (row, d) in enumerate(zip(rows, day, strict=True)):
        if d < split.history_days:
            trained_at = row.transaction.event_time
            # The importer stores what ScoreTransaction's time rule accepts; nothing else is checked there.
            if event_time_refusal(row.transaction.event_time, now) is None:
                kept.append((i, -1))
            continue
        reason = _refusal(row, numbering, now)
        if reason is None:
            kept.append((i, replay_index))
        else:
            refusals[reason] = refusals.get(reason, 0) + 1
        replay_index += 1
    kept.sort(key=lambda k: rows[k[0]].customer_ref)  # stable: each customer's rows stay in time order
    picked = [rows[i] for i, _ in kept]
    index = np.array([j for _, j in kept], dtype=np.int64)
    replayed = index >= 0
    txns = [r.transaction for r in picked]
    times = np.array([t.event_time.timestamp() for t in txns], dtype=np.float64)
    is_fraud = np.array([bool(r.is_fraud) for r in picked], dtype=np.bool_)
    due = [t.event_time + delay for t in txns]  # when a label arrives, in the replay's own arithmetic
    labelled = np.array([at.timestamp() for at in due]) if labels else np.full(len(times), np.nan)
    # History fraud is imported as an outcome when known by the end of history; replayed fraud is reported
    # ``delay`` late (the server counts it once its report time has passed). The rest is never labelled.
    known_then = ~replayed & np.array([labels and at <= trained_at for at in due], dtype=np.bool_)
    label_times = np.where(is_fraud & (known_then | replayed), labelled, np.nan)
    fraud = ~np.isnan(label_times)
    customers = np.array([r.customer_ref for r in picked], dtype=object)
    amounts = np.array([t.amount_minor / 10 ** (minor_exponent(t.currency) or 0) for t in txns])
    latitudes = np.array([np.nan if t.latitude is None else t.latitude for t in txns], dtype=np.float64)
    longitudes = np.array([np.nan if t.longitude is None else t.longitude for t in txns], dtype=np.float64)
    places = np.array([place_key(t.terminal_id, t.merchant_id) for t in txns], dtype=object)
    everything = History(
        customers=customers,
        times=times,
        amounts=amounts,
        # Where ScoringUnit reads a place's activity: the terminal, or the merchant of a row without one.
        keys=np.array(
            [f"t:{t.terminal_id}" if t.terminal_id else f"m:{t.merchant_id}" for t in txns], dtype=object
        ),
        fraud=fraud,
        label_times=label_times,
        latitudes=latitudes,
        longitudes=longitudes,
    )
    history = History(
        customers=customers[~replayed],
        times=times[~replayed],
        amounts=amounts[~replayed],
        # What load_history reads back: the terminal id, else the merchant id.
        keys=places[~replayed],
        fraud=fraud[~replayed],
        label_times=label_times[~replayed],
        latitudes=latitudes[~replayed],
        longitudes=longitudes[~replayed],
    )
    later_times = np.array(
        [
            r.transaction.event_time.timestamp()
            for r, d in zip(rows, day, strict=True)
            if d >= split.history_days
        ]
    )
    reported = 0
    if labels and len(later_times):
        # A report goes out before the first later row at or after its time (see _replay).
        position = np.searchsorted(later_times, labelled[replayed & is_fraud], side="left")
        reported = int(np.sum(np.maximum(position, index[replayed & is_fraud] + 1) < len(later_times)))
    test_day = np.array([day[i] >= split.test_start for i, _ in kept], dtype=np.bool_)
    return _Stored(
        history=history,
        everything=everything,
        replayed=replayed,
        index=index,
        row=np.array([i for i, _ in kept], dtype=np.int64),
        measured=replayed & test_day,
        fraud=is_fraud,
        scenario=np.array([r.scenario or 0 for r in picked], dtype=np.int64),
        refusals=refusals,
        outcomes_reported=reported,
        seconds=time.perf_counter() - clock,
        places=places,
    )


def _refusal(row: CsvTransaction, numbering: Numbering, now: datetime) -> str | None:
    """How ScoreTransactions answers a row it refuses at validation (as ``_replay`` counts it), else None."""
    check = Checker()
    _check_transaction(numbering, check, transaction_message(row), now)
    try:
        check.done()
    except InvalidArgument as error:
        reply = stream_error(error)
        return reply.reason or reply.code
    return None


def _score_seed(stored: _Stored, config: TrainingConfig, jobs: int, progress: Progress | None) -> SeedResult:
    clock = time.perf_counter()
    trained = train(stored.history, config, progress=_pair(progress, "train"), jobs=jobs)
    seconds = {"prepare": stored.seconds, "train": time.perf_counter() - clock}
    clock = time.perf_counter()
    everything = stored.everything
    # Features by the places the profile keys (``everything.keys`` are the place activity's, prefixed).
    X = batch_features(  # noqa: N806 - matrix
        everything.customers,
        everything.times,
        everything.amounts,
        stored.places,
        everything.latitudes,
        everything.longitudes,
    )
    models = ModelSet(
        trained.global_model,
        {m.customer: CustomerForest(m.forest, m.sample_count) for m in trained.customer_models},
    )
    risk = np.full(len(X), np.nan)
    risk[stored.replayed] = set_risk(everything, X, stored.replayed, models)
    seconds["score"] = time.perf_counter() - clock
    # In replay order, as the server's answers arrive.
    measured = np.flatnonzero(stored.measured)
    measured = measured[np.argsort(stored.index[measured], kind="stable")]
    y, s = stored.fraud[measured], risk[measured]
    return SeedResult(
        seed=config.seed,
        overall=detection(y, s),
        scenarios=by_scenario(y, s, stored.scenario[measured]),
        scored=int(stored.replayed.sum()),
        refused=sum(stored.refusals.values()),
        refusals=dict(stored.refusals),
        outcomes_reported=stored.outcomes_reported,
        resolution=resolution(s),
        seconds=seconds,
        training=trained.metrics,
        scores={int(stored.row[p]): float(risk[p]) for p in np.flatnonzero(stored.replayed)},
    )


def _run_seed(
    rows: list[CsvTransaction],
    day: list[int],
    split: Split,
    config: TrainingConfig,
    labels: bool,
    delay: timedelta,
    tmp: Path,
    progress: Progress | None,
) -> SeedResult:
    settings = Settings(
        data_dir=tmp,
        listen="127.0.0.1:0",
        insecure_no_auth=True,
        metrics_enabled=False,
        log_level="WARNING",
    )
    seconds: dict[str, float] = {}
    history = [r for r, d in zip(rows, day, strict=True) if d < split.history_days]
    later = [(r, d) for r, d in zip(rows, day, strict=True) if d >= split.history_days]
    later_rows = [i for i, d in enumerate(day) if d >= split.history_days]
    trained_at = history[-1].transaction.event_time if history else rows[0].transaction.event_time

    clock = time.perf_counter()
    upgrade(settings.effective_database_url)
    database = Database(settings.effective_database_url)
    try:
        importer = Importer.on(database, build_numbering(settings))
        importer.import_rows(history, progress=_step(progress, "import", len(history)))
        # Customers whose first payment comes after the history are enrolled (issued a number) before it, as
        # they would be in production; they reach the model with no history at all.
        for ref in dict.fromkeys(r.customer_ref for r, _ in later):
            importer.customer_for(ref)
        if labels:
            known = [
                (r.transaction.transaction_id, Outcome.FRAUD, r.transaction.event_time + delay)
                for r in history
                if r.is_fraud and r.transaction.event_time + delay <= trained_at
            ]
            importer.import_outcomes(known)
        seconds["import"] = time.perf_counter() - clock

        clock = time.perf_counter()
        report = train_and_register(
            SqlHistoryStore(database),
            SqlModelRegistry(database),
            config,
            actor="evaluate",
            progress=_pair(progress, "train"),
        )
        seconds["train"] = time.perf_counter() - clock
    finally:
        database.dispose()

    clock = time.perf_counter()
    scores, refusals, reported = asyncio.run(
        _replay(settings, later, labels=labels, delay=delay, already=trained_at, progress=progress)
    )
    seconds["replay"] = time.perf_counter() - clock

    measured = [(i, r) for i, (r, d) in enumerate(later) if d >= split.test_start and i in scores]
    y = np.array([bool(r.is_fraud) for _, r in measured])
    s = np.array([scores[i] for i, _ in measured])
    scenario = np.array([r.scenario or 0 for _, r in measured])
    return SeedResult(
        seed=config.seed,
        overall=detection(y, s),
        scenarios=by_scenario(y, s, scenario),
        scored=len(scores),
        refused=sum(refusals.values()),
        refusals=refusals,
        outcomes_reported=reported,
        resolution=resolution(s),
        seconds=seconds,
        training=report.metrics,
        scores={later_rows[i]: score for i, score in scores.items()},
    )


_DEFAULT_THRESHOLDS = Thresholds(
    review=Settings.model_fields["risk_review_threshold"].default,
    decline=Settings.model_fields["risk_decline_threshold"].default,
)


def _rules_effect(
    rows: list[CsvTransaction],
    day: list[int],
    split: Split,
    scores: dict[int, float],
    rules: Sequence[Rule],
    thresholds: Thresholds,
    time_zone: str | None,
) -> DayCounts:
    """What ``rules`` do over the test days on top of the model's decisions, replayed as a backtest does.

    The history days are imported history, every replayed row is stored with its score and the decision
    ``thresholds`` give it; each row is labelled with the dataset's truth.
    """
    kept = [i for i, d in enumerate(day) if d < split.history_days or i in scores]
    kept.sort(key=lambda i: rows[i].customer_ref)  # stable: each customer's rows stay in time order
    stored = []
    for i in kept:
        txn, score = rows[i].transaction, scores.get(i)
        stored.append(
            ReplayRow(
                transaction_id=txn.transaction_id,
                customer_id=rows[i].customer_ref,
                event_time=txn.event_time,
                amount_minor=txn.amount_minor,
                currency=txn.currency,
                merchant_id=txn.merchant_id,
                terminal_id=txn.terminal_id,
                mcc=txn.mcc,
                channel=txn.channel,
                in_history=True,
                source=TransactionSource.IMPORT if score is None else TransactionSource.SCORE,
                risk_score=score,
                decision=None if score is None else thresholds.decide(score),
                reason_codes=(),
                fraud=bool(rows[i].is_fraud),
            )
        )
    first = rows[0].transaction.event_time
    since = datetime.combine(first.date() + timedelta(days=split.test_start), datetime.min.time(), UTC)
    policy = Policy.build(0, [], [], rules)
    zone = ZoneInfo(time_zone or Settings.model_fields["policy_time_zone"].default)
    return replay(policy, [stored], since=since, now=datetime.now(UTC), zone=zone).total


def _step(progress: Progress | None, stage: str, total: int) -> Callable[[int], None] | None:
    if progress is None:
        return None
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress(stage, done, total)

    return advance


def _pair(progress: Progress | None, stage: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(stage, done, total)


def transaction_message(row: CsvTransaction, *, number: str = "") -> risk_pb2.Transaction:
    """``row`` as a gateway sends it: naming the customer by ``number``, or else by the row's external id."""
    txn = row.transaction
    message = risk_pb2.Transaction(
        transaction_id=txn.transaction_id,
        amount=common_pb2.Money(amount_minor=txn.amount_minor, currency=txn.currency),
        merchant_id=txn.merchant_id,
        terminal_id=txn.terminal_id,
        mcc=txn.mcc,
        channel=_CHANNELS.get(txn.channel.value, common_pb2.CHANNEL_UNSPECIFIED),
    )
    if number:
        message.customer_number = number
    else:
        message.external_id.CopyFrom(
            common_pb2.ExternalId(namespace=DEFAULT_NAMESPACE, value=row.customer_ref)
        )
    message.event_time.FromDatetime(txn.event_time)
    if txn.latitude is not None and txn.longitude is not None:
        message.location.latitude = txn.latitude
        message.location.longitude = txn.longitude
    return message


async def _replay(
    settings: Settings,
    later: list[tuple[CsvTransaction, int]],
    *,
    labels: bool,
    delay: timedelta,
    already: Any,
    progress: Progress | None,
) -> tuple[dict[int, float], dict[str, int], int]:
    from posguard_server.app import build_server

    server, port = build_server(settings)
    await server.start()
    scores: dict[int, float] = {}
    refused = 0
    reasons: dict[str, int] = {}
    reported = 0
    due: list[tuple[Any, int, str]] = []
    answered: dict[int, bool] = {}  # index -> stored (False: refused)
    arrived = asyncio.Condition()
    try:
        async with Client(f"127.0.0.1:{port}", timeout=60.0) as client:

            async def requests() -> AsyncIterator[risk_pb2.ScoreTransactionsRequest]:
                nonlocal reported
                for index, (row, _) in enumerate(later):
                    now = row.transaction.event_time
                    while labels and due and due[0][0] <= now:
                        at, scored_index, transaction_id = heapq.heappop(due)
                        # A label can only be reported on a transaction the server has already stored.
                        async with arrived:
                            await arrived.wait_for(partial(operator.contains, answered, scored_index))
                        if not answered[scored_index]:
                            continue  # refused by validation: there is nothing stored to label
                        request = risk_pb2.ReportOutcomeRequest(
                            request_id=f"eval-outcome-{transaction_id}"[:128],
                            transaction_id=transaction_id,
                            outcome=risk_pb2.OUTCOME_FRAUD,
                        )
                        request.reported_at.FromDatetime(at)
                        await client.report_outcome(request)
                        reported += 1
                    if labels and row.is_fraud:
                        heapq.heappush(due, (now + delay, index, row.transaction.transaction_id))
                    yield risk_pb2.ScoreTransactionsRequest(
                        request_id=f"eval-{index}", transaction=transaction_message(row)
                    )

            async for response in client.score_transactions(requests(), timeout=STREAM_TIMEOUT):
                if response.HasField("result"):
                    scores[response.index] = response.result.risk_score
                else:
                    refused += 1
                    reasons[response.error.reason or response.error.code] = (
                        reasons.get(response.error.reason or response.error.code, 0) + 1
                    )
                async with arrived:
                    answered[response.index] = response.HasField("result")
                    arrived.notify_all()
                done = len(scores) + refused
                if progress is not None and done % 2000 == 0:
                    progress("replay", done, len(later))
    finally:
        await server.stop()
    return scores, reasons, reported
