"""``posguard-server demo``: one simulated day of a payment gateway, scored live by a real server.

On a fresh data directory with its own SQLite database (never the configured one), the demo:

1. takes a labelled canonical transactions CSV (by default the handbook development file next to the
   repository when it is there, else the sample shipped in ``tests/data``), the first ``customers`` customer
   references of it, and one day: by default the latest day with labelled fraud among them, so that the
   decisions at the end have fraud to line up with;
2. starts ``posguard-server serve`` in a subprocess on a free loopback port, with authentication on;
3. creates an admin key as ``posguard-server keys create`` does, and with it a gateway key over the Admin RPC;
4. imports the customers' transactions before the day as history, with the fraud labels a bank would know
   by then (reported ``LABEL_DELAY`` late), then trains and activates the models, and waits until the
   running server answers with them;
5. plays the gateway: sends the day's transactions in time order with ``posguard.Client.score_transaction``,
   each under the customer number the customer's card would present, then reports the day's fraud through
   ``ReportOutcome`` as the chargebacks would arrive;
6. lines the decisions up with the dataset's labels, lists the riskiest payments with their reasons, and
   writes the evaluation report (HTML and PNG plots) of the scores the server gave that day.

Nothing of the demo is faked: the scores come from the real server over gRPC, from models trained here on the
dataset's history. The day's transactions are held back from the import, so the models never saw them.
"""

from __future__ import annotations

import collections
import csv
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import IO, Final, Never

import numpy as np
from tqdm import tqdm

import posguard
from posguard.v1 import admin_pb2, common_pb2, risk_pb2
from posguard_models.training import TrainingConfig
from posguard_server.config import Settings
from posguard_server.domain.api_keys import Role, create_key
from posguard_server.domain.currencies import minor_exponent
from posguard_server.domain.risk import Outcome
from posguard_server.issuers import build_numbering
from posguard_server.pipeline.evaluate import transaction_message
from posguard_server.pipeline.importer import (
    DEFAULT_NAMESPACE,
    CsvTransaction,
    Importer,
    ImportError_,
    ImportSummary,
    open_text,
    read_transactions,
)
from posguard_server.pipeline.report import ReportInput, ScoredSet, Standing, write_report
from posguard_server.pipeline.trainer import train_and_register
from posguard_server.store.api_keys import SqlApiKeyStore
from posguard_server.store.history import SqlHistoryStore
from posguard_server.store.migrate import open_database
from posguard_server.store.model_registry import SqlModelRegistry

# Chargebacks and fraud reports reach a bank about a week after the payment; the history the models learn
# from carries only the labels known by the start of the day, as in the evaluation protocol.
LABEL_DELAY: Final = timedelta(days=7)
DEFAULT_DATA_DIR: Final = Path("var") / "demo"
DEFAULT_CUSTOMERS: Final = 200
# A previous demo's data directory carries this file; only such a directory is replaced without asking.
MARKER: Final = ".posguard-demo"
# name -> (development file in ../shared/data, sample in tests/data)
DATASETS: Final = {
    "handbook": ("handbook_dev.csv.gz", "handbook_sample.csv.gz"),
    "sparkov": ("sparkov_dev.csv.gz", "sparkov_sample.csv.gz"),
}
SERVER_START_SECONDS: Final = 90.0
MODEL_PICKUP_SECONDS: Final = 30.0
_SERVING = re.compile(r"posguard serving on \S+:(\d+)")
DECISIONS: Final = ("APPROVE", "REVIEW", "DECLINE")

Echo = Callable[[str], None]


class DemoError(ValueError):
    """The demo cannot run as asked; the message says why and what to change."""


@dataclass(frozen=True, slots=True)
class DemoOptions:
    data_dir: Path = DEFAULT_DATA_DIR
    dataset: str = "handbook"  # a name of DATASETS or the path of a canonical transactions CSV
    customers: int | None = DEFAULT_CUSTOMERS  # the first this many customer references; None: all
    transactions: int | None = None  # send at most this many of the day's transactions; None: all
    day: date | None = None  # None: the latest day with labelled fraud (else the last day)
    labels: bool = True  # import the fraud labels known before the day
    seed: int = 0
    review_threshold: float = 0.99
    decline_threshold: float = 0.999


@dataclass(frozen=True, slots=True)
class Payment:
    """One of the day's transactions and the server's answer to it."""

    row: CsvTransaction
    risk_score: float
    decision: str  # APPROVE, REVIEW or DECLINE
    reasons: tuple[str, ...]
    model: str  # which model decided, in words
    seconds: float  # round trip seen by the gateway


@dataclass(slots=True)
class DemoResult:
    dataset: Path
    day: date
    customers: int
    customers_in_file: int
    history_rows: int
    labels_known: int
    version: str
    customer_models: int
    sent: int = 0
    payments: list[Payment] = field(default_factory=list)
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes_reported: int = 0
    report: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        """Whether the dataset says which of the day's transactions were fraud."""
        return bool(self.payments) and all(p.row.is_fraud is not None for p in self.payments)


# -- inputs ---------------------------------------------------------------------------------------------


def _source_root() -> Path:
    # server/posguard_server/pipeline/demo.py -> the checkout this module runs from (an editable install).
    return Path(__file__).resolve().parents[3]


def find_dataset(name: str) -> Path:
    """A dataset by name (its development file next to the repository, else its sample) or by path."""
    if name not in DATASETS:
        path = Path(name)
        if path.is_file():
            return path
        raise DemoError(f"no dataset {name!r}: give {' or '.join(DATASETS)}, or a canonical transactions CSV")
    development, sample = DATASETS[name]
    roots = list(dict.fromkeys([Path.cwd(), _source_root()]))
    # The full development files live beside the repository, never in it; the samples ship with it.
    candidates = [root.parent / "shared" / "data" / development for root in roots]
    candidates += [root / "tests" / "data" / sample for root in roots]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DemoError(f"neither {development} nor {sample} was found: pass --dataset PATH")


def fresh_data_dir(path: Path) -> None:
    """Make ``path`` an empty data directory, replacing a previous demo's but nothing else."""
    if path.exists():
        if not path.is_dir():
            raise DemoError(f"{path} is not a directory")
        if any(path.iterdir()):
            if not (path / MARKER).is_file():
                raise DemoError(
                    f"{path} is not empty and was not made by the demo: choose another --data-dir"
                )
            shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text(
        "made by `posguard-server demo`, which replaces this directory on its next run\n"
    )


def select_rows(dataset: Path, customers: int | None, subset: Path) -> tuple[list[CsvTransaction], int]:
    """The rows of the first ``customers`` customer references (sorted), in time order, and how many
    customers the file has. The rows kept are written to ``subset`` first, so the demo's inputs stay in
    its data directory and only they are parsed (the development files have ~500,000 rows).
    """
    with open_text(dataset) as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or "customer_ref" not in header:
            raise DemoError(f"{dataset.name} is not a canonical transactions CSV (no customer_ref column)")
        column = header.index("customer_ref")
        refs = {row[column].strip() for row in reader if len(row) > column}
    chosen = set(sorted(refs)[:customers]) if customers is not None else refs
    with open_text(dataset) as handle, subset.open("w", encoding="utf-8", newline="") as target:
        reader = csv.reader(handle)
        writer = csv.writer(target)
        writer.writerow(next(reader))
        writer.writerows(row for row in reader if len(row) > column and row[column].strip() in chosen)
    try:
        rows = list(read_transactions(subset))
    except ImportError_ as error:
        raise DemoError(f"{dataset.name} (as {subset.name}): {error}") from None
    rows.sort(key=lambda r: (r.transaction.event_time, r.line))
    return rows, len(refs)


def choose_day(rows: Sequence[CsvTransaction], wanted: date | None) -> date:
    """The day to play: ``wanted``, or else the day of the later half with the most labelled fraud (the latest
    of equals), so that the models have at least half the history behind them and the decisions have fraud
    to line up with; the last day when nothing is labelled. Never the first day: it has no history before it.
    """
    days = sorted({r.transaction.event_time.date() for r in rows})
    if len(days) < 2:
        raise DemoError("the dataset needs transactions on at least two days: history, then the day")
    if wanted is not None:
        if wanted not in days[1:]:
            raise DemoError(f"--day must be a day of the dataset from {days[1]} to {days[-1]}")
        return wanted
    later = days[len(days) // 2 :]
    fraud = collections.Counter(r.transaction.event_time.date() for r in rows if r.is_fraud)
    return max(reversed(later), key=lambda day: fraud[day])


def _day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


# -- the server -----------------------------------------------------------------------------------------


class ServerProcess:
    """``posguard-server serve`` in a process of its own, logging to a file in the data directory."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        command = [
            sys.executable,
            "-m",
            "posguard_server",
            "--data-dir",
            str(settings.data_dir),
            "--database-url",
            settings.effective_database_url,
            "--listen",
            "127.0.0.1:0",
            "--no-metrics-enabled",
            # The demo waits for the server to switch to the models it trains: check the registry often.
            "--model-refresh-seconds",
            "1",
            "--risk-review-threshold",
            repr(settings.risk_review_threshold),
            "--risk-decline-threshold",
            repr(settings.risk_decline_threshold),
            "--grace-period",
            "2",
            "--log-level",
            "INFO",
            "serve",
        ]
        # POSGUARD_* variables configure the operator's own server (its database, keys, TLS): not this one.
        env = {name: value for name, value in os.environ.items() if not name.startswith("POSGUARD_")}
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module, no shell
            command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env
        )

    def wait_serving(self, timeout: float = SERVER_START_SECONDS) -> int:
        """The port once the server logs that it serves; the log's end in the error if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _SERVING.search(self.log_path.read_text(encoding="utf-8", errors="replace"))
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        tail = self.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        raise DemoError("the server did not start:\n  " + "\n  ".join(tail or ["(nothing logged)"]))

    def stop(self) -> None:
        """SIGTERM (a graceful shutdown), then kill if it hangs."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@contextmanager
def running_server(settings: Settings, log_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(settings, log_path)
    try:
        yield server
    finally:
        server.stop()


# -- the run --------------------------------------------------------------------------------------------


def demo_settings(options: DemoOptions) -> Settings:
    """Settings of the demo's own store, given explicitly so that no POSGUARD_* variable redirects it."""
    return Settings(
        data_dir=options.data_dir,
        database_url=f"sqlite:///{(options.data_dir / 'posguard.db').resolve()}",
        listen="127.0.0.1:0",
        metrics_enabled=False,
        issuers_file=None,
        default_issuer="default",
        number_keys=None,
        tls_cert_file=None,
        tls_key_file=None,
        tls_client_ca_file=None,
        insecure_no_auth=False,
        risk_review_threshold=options.review_threshold,
        risk_decline_threshold=options.decline_threshold,
    )


def _bar(total: int, desc: str, unit: str) -> tqdm[Never]:
    # Rate and ETA on a terminal; nothing when the output goes to a file or a pipe.
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None, leave=True)


def run_demo(options: DemoOptions, echo: Echo) -> DemoResult:
    """Run the whole demo, narrating each step through ``echo``; the result holds what the summary shows."""
    clock = time.perf_counter()
    dataset = find_dataset(options.dataset)
    fresh_data_dir(options.data_dir)
    settings = demo_settings(options)
    database = open_database(settings.effective_database_url)  # migrated here, before the server opens it
    try:
        echo(f"data directory  {shown(options.data_dir)} (fresh SQLite database, keys and report)")
        with running_server(settings, options.data_dir / "server.log") as server:
            # The server starts while the dataset is read: its start-up and the parsing overlap.
            rows, customers_in_file = select_rows(
                dataset, options.customers, options.data_dir / "dataset.csv"
            )
            if not rows:
                raise DemoError(f"{dataset.name} has no transactions")
            day = choose_day(rows, options.day)
            start = _day_start(day)
            history = [r for r in rows if r.transaction.event_time < start]
            today = [r for r in rows if start <= r.transaction.event_time < start + timedelta(days=1)]
            of_day = len(today)
            if options.transactions is not None:
                today = today[: options.transactions]
            customers = len({r.customer_ref for r in rows})
            why = "as asked" if options.day is not None else "the day with the most fraud in the later half"
            echo(
                f"dataset         {shown(dataset)}: {customers:,} of {customers_in_file:,} customers, "
                f"{len(rows):,} transactions"
            )
            capped = f" (the first {len(today):,} of {of_day:,})" if len(today) < of_day else ""
            echo(
                f"the day         {day}, {why}: {len(today):,} transactions{capped}, kept out of the history"
            )
            port = server.wait_serving()
            target = f"127.0.0.1:{port}"
            echo(
                f"server          posguard-server serve, pid {server.process.pid}, on {target} "
                f"(log: {shown(server.log_path)})"
            )

            admin_key, admin_token = create_key(
                SqlApiKeyStore(database), name="demo admin", role=Role.ADMIN, created_by="demo"
            )
            assert admin_token is not None  # a new key, not a replay: its token is returned
            with posguard.Client(target, api_key=admin_token, timeout=10.0) as admin:
                created = admin.create_api_key(name="demo gateway", role=admin_pb2.ROLE_GATEWAY)
            echo(
                f"API keys        admin {admin_key.key_id} (made as `keys create` does), "
                f"gateway {created.key.key_id} (made by the admin over Admin.CreateApiKey)"
            )

            timer = time.perf_counter()
            imported, labels = _import_history(
                Importer.on(database, build_numbering(settings), actor="demo"),
                history,
                today,
                labels_by=start if options.labels else None,
            )
            seconds_import = time.perf_counter() - timer
            first, last = history[0].transaction.event_time, history[-1].transaction.event_time
            known = (
                f"{labels:,} fraud labels known by the day (reported {LABEL_DELAY.days} days late) "
                "imported as outcomes"
                if options.labels
                else "no fraud labels imported (--no-labels)"
            )
            echo(
                f"history         {imported.rows:,} transactions from {first:%Y-%m-%d} to {last:%Y-%m-%d} "
                f"imported in {seconds_import:.1f} s; {imported.customers_created:,} customers given numbers"
            )
            echo(f"                {known}")

            timer = time.perf_counter()
            with _bar(1, "training", "customer") as bar:

                def trained(done: int, total: int) -> None:
                    bar.total = total
                    bar.update(done - bar.n)

                report = train_and_register(
                    SqlHistoryStore(database),
                    SqlModelRegistry(database),
                    TrainingConfig(seed=options.seed),
                    actor="demo",
                    progress=trained,
                )
            seconds_train = time.perf_counter() - timer
            echo(
                f"training        version {report.version}: a global model and {report.customer_models:,} "
                f"customer models, activated; {seconds_train:.1f} s"
            )

            result = DemoResult(
                dataset=dataset,
                day=day,
                customers=customers,
                customers_in_file=customers_in_file,
                history_rows=imported.rows,
                labels_known=labels,
                version=report.version,
                customer_models=report.customer_models,
                seconds={"import": seconds_import, "train": seconds_train},
            )
            with posguard.Client(target, api_key=created.token, timeout=10.0) as gateway:
                _await_models(gateway, today[0].customer_ref, result.version)
                echo("                the running server answers with it, without a restart")
                _play_day(gateway, today, result, echo)
                result.outcomes_reported = _report_outcomes(gateway, result.payments)
    except posguard.PosguardError as error:
        raise DemoError(
            f"the server refused a call: {error} (its log: {shown(settings.data_dir / 'server.log')})"
        ) from None
    finally:
        database.dispose()
    result.report = _write_report(result, options)
    result.seconds["total"] = time.perf_counter() - clock
    return result


def _import_history(
    importer: Importer,
    history: Sequence[CsvTransaction],
    today: Sequence[CsvTransaction],
    *,
    labels_by: datetime | None,
) -> tuple[ImportSummary, int]:
    """Import the history, enrol the day's new customers, and import the fraud labels known by
    ``labels_by`` (none when it is None); returns the import's summary and the labels imported."""
    with _bar(len(history), "importing history", "row") as bar:

        def advance(count: int) -> None:
            bar.update(count)

        imported = importer.import_rows(history, progress=advance)
    # Customers whose first payment is on the day were enrolled (given a number) before it.
    for ref in dict.fromkeys(r.customer_ref for r in today):
        importer.customer_for(ref)
    labels = [
        (r.transaction.transaction_id, Outcome.FRAUD, r.transaction.event_time + LABEL_DELAY)
        for r in history
        if labels_by is not None and r.is_fraud and r.transaction.event_time + LABEL_DELAY <= labels_by
    ]
    importer.import_outcomes(labels)
    return imported, len(labels)


def _await_models(gateway: posguard.Client, ref: str, version: str) -> None:
    """Wait until the server scores with ``version``: it polls the registry, nobody tells it."""
    selector = common_pb2.CustomerSelector(
        external_id=common_pb2.ExternalId(namespace=DEFAULT_NAMESPACE, value=ref)
    )
    started = time.monotonic()
    while True:
        profile = gateway.get_customer_risk_profile(customer=selector)
        if profile.active_model.version == version:
            return
        if time.monotonic() - started > MODEL_PICKUP_SECONDS:
            raise DemoError(f"the server did not switch to version {version}")
        time.sleep(0.1)


def _model_text(model: risk_pb2.ModelInfo) -> str:
    scope = risk_pb2.ModelScope.Name(model.scope).removeprefix("MODEL_SCOPE_").lower()
    history = f"{model.history_size:,} transactions of history"
    return f"{scope} model, {history}" + (" (cold start)" if model.cold_start else "")


def _play_day(
    gateway: posguard.Client, today: Sequence[CsvTransaction], result: DemoResult, echo: Echo
) -> None:
    """Send the day's transactions one by one, in time order, as a gateway does for each payment."""
    numbers: dict[str, str] = {}
    for ref in dict.fromkeys(r.customer_ref for r in today):
        # The number is what the customer's card presents at the till; the dataset knows its own reference.
        resolved = gateway.resolve_external_id(
            external_id=common_pb2.ExternalId(namespace=DEFAULT_NAMESPACE, value=ref)
        )
        numbers[ref] = resolved.primary_number
    echo(
        f"gateway         {len(today):,} payments of {len(numbers):,} customers, one "
        f"posguard.Client.score_transaction each, by customer number"
    )
    timer = time.perf_counter()
    with _bar(len(today), f"payments on {result.day}", "payment") as bar:
        for row in today:
            request = risk_pb2.ScoreTransactionRequest(
                request_id=f"demo-{row.transaction.transaction_id}"[:128],
                transaction=transaction_message(row, number=numbers[row.customer_ref]),
            )
            sent = time.perf_counter()
            try:
                answer = gateway.score_transaction(request)
            except posguard.PosguardError as error:
                result.refused[error.reason or error.code.name] += 1
            else:
                result.payments.append(
                    Payment(
                        row=row,
                        risk_score=answer.risk_score,
                        decision=risk_pb2.Decision.Name(answer.decision).removeprefix("DECISION_"),
                        reasons=tuple(reason.message for reason in answer.reasons),
                        model=_model_text(answer.model),
                        seconds=time.perf_counter() - sent,
                    )
                )
            result.sent += 1
            bar.update(1)
    result.seconds["day"] = time.perf_counter() - timer


def _report_outcomes(gateway: posguard.Client, payments: Sequence[Payment]) -> int:
    """Report the day's fraud as its chargebacks would arrive, ``LABEL_DELAY`` later."""
    reported = 0
    for payment in payments:
        if not payment.row.is_fraud:
            continue
        request = risk_pb2.ReportOutcomeRequest(
            request_id=f"demo-outcome-{payment.row.transaction.transaction_id}"[:128],
            transaction_id=payment.row.transaction.transaction_id,
            outcome=risk_pb2.OUTCOME_FRAUD,
            note="label of the demo dataset",
        )
        request.reported_at.FromDatetime(payment.row.transaction.event_time + LABEL_DELAY)
        gateway.report_outcome(request)
        reported += 1
    return reported


def _write_report(result: DemoResult, options: DemoOptions) -> Path | None:
    """The evaluation report of the scores the server gave on the day, against the reported fraud."""
    if not result.payments:
        return None
    times = [p.row.transaction.event_time for p in result.payments]
    written = write_report(
        ReportInput(
            title=f"posguard demo: the payments of {result.day}, as scored live",
            generated_at=datetime.now(UTC),
            window_start=min(times),
            window_end=max(times),
            fraud=np.array([bool(p.row.is_fraud) for p in result.payments], dtype=np.bool_),
            candidate=ScoredSet(
                Standing.SERVED.value,
                result.version,
                np.array([p.risk_score for p in result.payments], dtype=np.float64),
            ),
            # The day is the served models' own: nothing to compare with, and the page says so plainly.
            active=None,
            standing=Standing.SERVED,
            review_threshold=options.review_threshold,
            decline_threshold=options.decline_threshold,
            summary=[
                ("dataset", result.dataset.name),
                ("customers", f"{result.customers:,} of {result.customers_in_file:,}"),
                ("history", f"{result.history_rows:,} transactions before {result.day}"),
                ("fraud labels known at training", f"{result.labels_known:,}"),
                ("models", f"version {result.version}: global and {result.customer_models:,} customer"),
                ("payments scored live", f"{len(result.payments):,} of {result.sent:,} sent"),
                ("labels", "the dataset's fraud labels, reported through ReportOutcome after the day"),
            ],
        ),
        options.data_dir / "report",
    )
    return written.html


# -- the summary ----------------------------------------------------------------------------------------


def shown(path: Path) -> str:
    """A path as the user can type it from here: relative to the working directory when close to it."""
    relative = os.path.relpath(path.resolve(), Path.cwd().resolve())
    return relative if not relative.startswith(os.pardir + os.sep + os.pardir) else str(path.resolve())


def _money(amount_minor: int, currency: str) -> str:
    exponent = minor_exponent(currency) or 0
    return f"{amount_minor / 10**exponent:,.{exponent}f} {currency}"


def _label(row: CsvTransaction) -> str:
    if row.is_fraud is None:
        return "unlabelled"
    if not row.is_fraud:
        return "genuine"
    return f"FRAUD (scenario {row.scenario})" if row.scenario else "FRAUD"


def summary_lines(result: DemoResult, *, top: int = 5) -> list[str]:
    """The decision table against the labels, the riskiest payments with their reasons, and the report."""
    payments = result.payments
    lines = [
        "",
        f"Decisions on {result.day}: {result.sent:,} payments sent, {len(payments):,} scored",
        f"  {'DECISION':<10}{'PAYMENTS':>10}{'FRAUD':>8}{'GENUINE':>9}",
    ]
    labelled = result.labelled
    for decision in (*DECISIONS, "total"):
        rows = [p for p in payments if decision in ("total", p.decision)]
        fraud = sum(1 for p in rows if p.row.is_fraud)
        cells = f"{fraud:>8,}{len(rows) - fraud:>9,}" if labelled else f"{'-':>8}{'-':>9}"
        lines.append(f"  {decision:<10}{len(rows):>10,}{cells}")
    for reason, count in sorted(result.refused.items()):
        lines.append(f"  {'refused':<10}{count:>10,}  ({reason})")
    if labelled:
        fraud = sum(1 for p in payments if p.row.is_fraud)
        alerts = [p for p in payments if p.decision != "APPROVE"]
        caught = sum(1 for p in alerts if p.row.is_fraud)
        lines.append(
            f"  fraud held or declined: {caught} of {fraud}; "
            f"alerts that were fraud: {caught} of {len(alerts)}"
        )
    if payments:
        latencies = np.array([p.seconds for p in payments]) * 1000
        rate = len(payments) / max(result.seconds["day"], 1e-9)
        lines.append(
            f"  gateway round trip: median {np.median(latencies):.1f} ms, "
            f"p99 {np.percentile(latencies, 99):.1f} ms; {rate:,.0f} payments/s"
        )

    riskiest = sorted(payments, key=lambda p: -p.risk_score)[:top]
    lines += ["", f"Highest risk on {result.day} ({len(riskiest)} of {len(payments):,})"]
    for rank, payment in enumerate(riskiest, 1):
        txn = payment.row.transaction
        lines.append(
            f"  {rank}. risk {payment.risk_score:.5f} {payment.decision:<8}{txn.event_time:%H:%M}  "
            f"customer {payment.row.customer_ref}  {_money(txn.amount_minor, txn.currency)} at "
            f"{txn.terminal_id or txn.merchant_id}  [{_label(payment.row)}]"
        )
        for reason in payment.reasons or ("(no single feature stands out)",):
            lines.append(f"       - {reason}")
        lines.append(f"       decided by the {payment.model}")

    lines.append("")
    if result.outcomes_reported:
        lines.append(f"Reported {result.outcomes_reported} fraud outcomes of the day through ReportOutcome.")
    if result.report is not None:
        lines.append(f"Evaluation report of the day: {shown(result.report)}")
    seconds = result.seconds
    lines.append(
        f"Done in {seconds['total']:.1f} s (import {seconds['import']:.1f} s, "
        f"training {seconds['train']:.1f} s, the day {seconds.get('day', 0.0):.1f} s); the server has stopped"
    )
    return lines
