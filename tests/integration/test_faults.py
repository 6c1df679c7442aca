"""Faults a deployment meets: the server killed mid-load, and the database going away and coming back.

Everything is real: ``posguard-server serve`` processes, the Python client, SQLite files, a shared PostgreSQL
and, for the outage, a private PostgreSQL instance of the test's own that it can stop without disturbing
anyone else. The tests are bounded so that CI can run them on a small machine.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import func, select

import posguard
from posguard.v1 import common_pb2, customer_ids_pb2, risk_pb2
from posguard_server.store.customers import SqlCustomer, SqlCustomerNumber, SqlNumberCounter
from posguard_server.store.db import Database
from posguard_server.store.risk_tables import SqlRiskTransaction

if TYPE_CHECKING:
    from .conftest import Cli, ServeProcess

pytestmark = pytest.mark.slow

# A call's deadline. Short, so that a call caught by a fault ends soon, yet far above a healthy call's time.
DEADLINE_S = 3.0
# Calls may overrun their deadline by this much: the client notices the deadline on its own clock.
DEADLINE_SLACK_S = 1.0
# How soon after the database is back the server must serve again (issue 6).
RECOVERY_LIMIT_S = 5.0


# -- servers as an operator runs them ----------------------------------------------------------------


class ServerLog:
    """Drains a server's stderr on a thread of its own.

    Nobody else reads the pipe once the server is serving; without a reader the server (one access line per
    call, a warning per failed one) would fill the pipe and block in its logging, which looks like a hang.
    """

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert process.stderr is not None
        self._stream = process.stderr
        self._thread = threading.Thread(target=self._drain, name="server-stderr", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        for line in self._stream:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def join(self) -> None:
        # The pipe ends with the process; read it to the end before anyone closes it.
        self._thread.join(timeout=10)


@dataclass
class Served:
    process: subprocess.Popen[str]
    port: int
    log: ServerLog

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def end(self, signum: signal.Signals) -> int:
        """Send ``signum`` and wait for the process to exit; its exit code."""
        self.process.send_signal(signum)
        code = self.process.wait(timeout=30)
        self.log.join()
        return code


def serve(serve_process: ServeProcess, data_dir: Path, flags: tuple[str, ...]) -> Served:
    process, port = serve_process(data_dir, *flags)
    return Served(process, port, ServerLog(process))


def gateway_key(cli: Cli, data_dir: Path, flags: tuple[str, ...]) -> str:
    created = cli("--data-dir", str(data_dir), *flags, "keys", "create", "--role", "gateway", "--json")
    assert created.returncode == 0, created.stderr
    token: str = json.loads(created.stdout)["token"]
    return token


def health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    return int(answer.status)


# -- requests ----------------------------------------------------------------------------------------


def new_transaction(number: str, rng: random.Random) -> risk_pb2.Transaction:
    event_time = Timestamp()
    # Distinct times in the recent past: features look only backwards, so any order is a valid history.
    event_time.FromDatetime(datetime.now(UTC) - timedelta(seconds=rng.randint(60, 30 * 86400)))
    return risk_pb2.Transaction(
        transaction_id="tx-" + uuid.uuid4().hex,
        customer_number=number,
        amount=common_pb2.Money(amount_minor=rng.randint(100, 50_000), currency="CNY"),
        merchant_id=f"m-{rng.randint(1, 5)}",
        terminal_id=f"t-{rng.randint(1, 9)}",
        mcc="5411",
        event_time=event_time,
        channel=common_pb2.CHANNEL_POS,
    )


def score_request(transaction: risk_pb2.Transaction) -> risk_pb2.ScoreTransactionRequest:
    # The request id is derived from the transaction, so a retry carries the very same request.
    return risk_pb2.ScoreTransactionRequest(
        request_id="rq-" + transaction.transaction_id, transaction=transaction
    )


def same_answer(first: risk_pb2.ScoreTransactionResponse, again: risk_pb2.ScoreTransactionResponse) -> bool:
    """``again`` is ``first`` replayed: everything but the ``replayed`` flag is identical."""
    replay = risk_pb2.ScoreTransactionResponse()
    replay.CopyFrom(again)
    replay.replayed = False
    return replay == first and again.replayed


# -- 1. the server killed mid-load ---------------------------------------------------------------------


@dataclass
class Ledger:
    """What the load sent and what the server acknowledged, across every server process of a test."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    # request_id -> the customer the server answered with
    issued: dict[str, customer_ids_pb2.Customer] = field(default_factory=dict)
    # transaction_id -> (the request, the answer)
    scored: dict[str, tuple[risk_pb2.ScoreTransactionRequest, risk_pb2.ScoreTransactionResponse]] = field(
        default_factory=dict
    )
    # Calls sent but never answered: their outcome is unknown until they are retried.
    pending_issues: set[str] = field(default_factory=set)
    pending_scores: dict[str, risk_pb2.ScoreTransactionRequest] = field(default_factory=dict)
    # (status code, seconds since the kill; negative = before it) of each failed call
    failures: list[tuple[grpc.StatusCode, float]] = field(default_factory=list)
    killed_at: float | None = None

    def numbers(self) -> list[str]:
        with self.lock:
            return [customer.primary.number for customer in self.issued.values()]

    def failed(self, error: posguard.PosguardError) -> None:
        with self.lock:
            since_kill = time.monotonic() - self.killed_at if self.killed_at is not None else -1.0
            self.failures.append((error.code, since_kill))


def write_load(client: posguard.Client, ledger: Ledger, stop: threading.Event, seed: int) -> None:
    """Issue and score until stopped or until a call fails (then the server is presumably dead)."""
    rng = random.Random(seed)
    while not stop.is_set():
        numbers = ledger.numbers()
        if not numbers or rng.random() < 0.5:
            request_id = "issue-" + uuid.uuid4().hex
            with ledger.lock:
                ledger.pending_issues.add(request_id)
            try:
                issued = client.issue_customer_id(request_id=request_id)
            except posguard.PosguardError as error:
                ledger.failed(error)
                return
            with ledger.lock:
                ledger.pending_issues.discard(request_id)
                ledger.issued[request_id] = issued.customer
        else:
            request = score_request(new_transaction(rng.choice(numbers), rng))
            transaction_id = request.transaction.transaction_id
            with ledger.lock:
                ledger.pending_scores[transaction_id] = request
            try:
                answer = client.score_transaction(request)
            except posguard.PosguardError as error:
                ledger.failed(error)
                return
            with ledger.lock:
                del ledger.pending_scores[transaction_id]
                ledger.scored[transaction_id] = (request, answer)


@dataclass
class RoundReport:
    acknowledged_issues: int
    acknowledged_scores: int
    in_flight_issues: int
    in_flight_scores: int
    # Unanswered calls whose retry was answered as a replay: they had committed before the kill.
    committed_unanswered: int


def load_then_kill(server: Served, token: str, ledger: Ledger, rng: random.Random) -> tuple[int, int]:
    """Run 6 writers against ``server``, SIGKILL it mid-load; (issues, scores) acknowledged by it."""
    issues_before, scores_before = len(ledger.issued), len(ledger.scored)
    stop = threading.Event()
    with posguard.Client(server.target, api_key=token, timeout=DEADLINE_S) as client:
        threads = [
            threading.Thread(
                target=write_load, args=(client, ledger, stop, rng.randrange(2**32)), daemon=True
            )
            for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        # Kill once the load is well under way (some answers in), at a random moment inside it.
        deadline = time.monotonic() + 30
        while len(ledger.issued) + len(ledger.scored) < issues_before + scores_before + 40:
            assert time.monotonic() < deadline, "the load made no progress"
            assert all(thread.is_alive() for thread in threads), f"a call failed: {ledger.failures}"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.05, 0.4))
        with ledger.lock:
            ledger.killed_at = time.monotonic()
        server.end(signal.SIGKILL)
        stop.set()
        for thread in threads:
            thread.join(timeout=DEADLINE_S + 10)
            assert not thread.is_alive(), "a call outlived its deadline after the kill"
    ledger.killed_at = None
    return len(ledger.issued) - issues_before, len(ledger.scored) - scores_before


def check_and_retry(
    server: Served, token: str, ledger: Ledger, checked_issues: set[str], checked_scores: set[str]
) -> int:
    """On a restarted server: every acknowledged write is there; the unanswered ones retry successfully.

    Returns how many unanswered calls turned out to have committed before the kill.
    """
    committed = 0
    with posguard.Client(server.target, api_key=token, timeout=DEADLINE_S) as client:
        for request_id, customer in list(ledger.issued.items()):
            if request_id in checked_issues:
                continue
            verified = client.verify_customer_id(number=customer.primary.number)
            assert verified.valid, f"an acknowledged number does not verify: {verified}"
            assert verified.customer_id == customer.customer_id
            again = client.issue_customer_id(request_id=request_id)
            assert again.replayed
            assert again.customer.customer_id == customer.customer_id
            assert again.customer.primary.number == customer.primary.number
            checked_issues.add(request_id)
        for transaction_id, (request, answer) in list(ledger.scored.items()):
            if transaction_id in checked_scores:
                continue
            again_scored = client.score_transaction(request)
            assert same_answer(answer, again_scored), f"{answer} was answered again as {again_scored}"
            checked_scores.add(transaction_id)
        # The calls cut off by the kill: a retry with the same request id either replays what had
        # committed or carries the call out now; never an error, never a second customer.
        for request_id in sorted(ledger.pending_issues):
            issued = client.issue_customer_id(request_id=request_id)
            committed += issued.replayed
            assert client.verify_customer_id(number=issued.customer.primary.number).valid
            again = client.issue_customer_id(request_id=request_id)
            assert again.replayed
            assert again.customer == issued.customer
            ledger.issued[request_id] = issued.customer
            checked_issues.add(request_id)
        ledger.pending_issues.clear()
        for transaction_id, request in sorted(ledger.pending_scores.items()):
            scored = client.score_transaction(request)
            committed += scored.replayed
            assert scored.transaction_id == transaction_id
            assert same_answer(_first(scored), client.score_transaction(request))
            ledger.scored[transaction_id] = (request, _first(scored))
            checked_scores.add(transaction_id)
        ledger.pending_scores.clear()
    return committed


def _first(answer: risk_pb2.ScoreTransactionResponse) -> risk_pb2.ScoreTransactionResponse:
    """The answer as a first call gets it (``replayed`` false), to compare later replays with."""
    first = risk_pb2.ScoreTransactionResponse()
    first.CopyFrom(answer)
    first.replayed = False
    return first


def check_database(database_url: str, ledger: Ledger) -> None:
    """No number issued twice, no counter value used twice, and exactly one row per call ever made."""
    database = Database(database_url)
    try:
        with database.session(read_only=True) as session:
            numbers = session.execute(
                select(SqlCustomerNumber.number, SqlCustomerNumber.prefix, SqlCustomerNumber.counter)
            ).all()
            counters = dict(
                session.execute(select(SqlNumberCounter.prefix, SqlNumberCounter.next_value)).all()
            )
            request_ids = set(session.scalars(select(SqlCustomer.request_id)))
            transaction_ids = set(session.scalars(select(SqlRiskTransaction.transaction_id)))
            customers = session.scalar(select(func.count()).select_from(SqlCustomer))
    finally:
        database.dispose()
    duplicates = [n for n, c in Counter(number for number, _, _ in numbers).items() if c > 1]
    assert not duplicates, f"numbers issued twice: {duplicates}"
    reused = [k for k, c in Counter((prefix, counter) for _, prefix, counter in numbers).items() if c > 1]
    assert not reused, f"counter values used twice: {reused}"
    for prefix, counter in {(prefix, counter) for _, prefix, counter in numbers}:
        # The counter row holds the next value to hand out: a lost update would hand this one out again.
        assert counter < counters[prefix], f"prefix {prefix}: counter {counter} may be handed out again"
    stored = {number for number, _, _ in numbers}
    assert {customer.primary.number for customer in ledger.issued.values()} <= stored
    # Every issue call (all retried to an answer by now) made exactly one customer; no retry made another.
    assert customers == len(ledger.issued)
    assert request_ids == set(ledger.issued)
    assert transaction_ids == set(ledger.scored)


KILLS = 3


def test_kill_mid_load_loses_no_acknowledged_write(
    database_url: str, tmp_path: Path, serve_process: ServeProcess, cli: Cli
) -> None:
    if database_url.startswith("sqlite"):
        # The embedded default: the SQLite file the server makes in its data directory.
        assert database_url == f"sqlite:///{tmp_path}/posguard.db"
        flags: tuple[str, ...] = ()
    else:
        flags = ("--database-url", database_url)
        assert cli("--data-dir", str(tmp_path), *flags, "db", "upgrade").returncode == 0
    token = gateway_key(cli, tmp_path, flags)
    ledger = Ledger()
    rng = random.Random(6)
    checked_issues: set[str] = set()
    checked_scores: set[str] = set()
    reports: list[RoundReport] = []
    server = serve(serve_process, tmp_path, flags)
    for _ in range(KILLS):
        issues, scores = load_then_kill(server, token, ledger, rng)
        in_flight = len(ledger.pending_issues), len(ledger.pending_scores)
        # Only the kill may fail calls, and only as a lost connection.
        assert all(since >= 0 for _, since in ledger.failures), ledger.failures
        assert {code for code, _ in ledger.failures} <= {
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        }, ledger.failures
        ledger.failures.clear()
        server = serve(serve_process, tmp_path, flags)
        committed = check_and_retry(server, token, ledger, checked_issues, checked_scores)
        reports.append(RoundReport(issues, scores, *in_flight, committed))
    assert server.end(signal.SIGTERM) == 0
    check_database(database_url, ledger)
    audit = cli("--data-dir", str(tmp_path), *flags, "audit", "verify")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    acknowledged = sum(r.acknowledged_issues + r.acknowledged_scores for r in reports)
    print(f"\n{database_url.split(':', 1)[0]}: {acknowledged} acknowledged, none lost; {reports}")
    # The kills did land mid-load: calls were cut off.
    assert sum(r.in_flight_issues + r.in_flight_scores for r in reports) > 0


# -- 2. the database goes away and comes back -----------------------------------------------------------


def postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl live on this machine, found at run time."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if found.returncode == 0:
            candidates.append(Path(found.stdout.strip()))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    # Debian and Ubuntu keep the server binaries off PATH, one directory per major version; newest first.
    candidates += sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PrivatePostgres:
    """A PostgreSQL instance of the test's own, in a temporary directory, on a free port.

    The directory lives in the system temp dir, not pytest's: under root the binaries run as another user,
    who must be able to reach it, and a unix socket path must stay short.
    """

    def __init__(self, bindir: Path, as_user: tuple[str, ...], owner: tuple[int, int] | None) -> None:
        self._bindir = bindir
        self._as_user = as_user
        self.root = Path(tempfile.mkdtemp(prefix="posguard-pg-"))
        if owner is not None:
            os.chown(self.root, *owner)
        self.port = free_port()
        self.data = self.root / "data"
        self.running = False
        self._postmaster: int | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 90) -> None:
        done = subprocess.run(
            [*self._as_user, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        assert done.returncode == 0, f"{args[0]} failed: {done.stdout}{done.stderr}"

    def init(self) -> None:
        self._run(
            str(self._bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )

    def start(self) -> None:
        # Durability does not matter here and fsync would only slow a shared machine down.
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=60 -c shared_buffers=16MB"
        )
        pg_ctl = str(self._bindir / "pg_ctl")
        log = str(self.root / "postgres.log")
        self._run(pg_ctl, "-D", str(self.data), "-l", log, "-o", options, "-w", "-t", "60", "start")
        self.running = True
        self._postmaster = int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self, mode: str) -> None:
        self._run(str(self._bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
        self.running = False

    def close(self) -> None:
        try:
            if self.running:
                self.stop("immediate")
        finally:
            self._reap()
            shutil.rmtree(self.root, ignore_errors=True)

    def _reap(self) -> None:
        """End the postmaster this test started if pg_ctl did not: a daemon would outlive the test run."""
        if self._postmaster is None:
            return
        cmdline = Path(f"/proc/{self._postmaster}/cmdline")
        # SIGQUIT is PostgreSQL's immediate shutdown; SIGKILL only if that did not end it.
        for signum in (signal.SIGQUIT, signal.SIGKILL):
            try:
                if str(self.data) not in cmdline.read_text():
                    return  # gone, and the pid now names someone else's process
                os.kill(self._postmaster, signum)
            except (FileNotFoundError, ProcessLookupError):
                return
            deadline = time.monotonic() + 10
            while cmdline.exists() and time.monotonic() < deadline:
                time.sleep(0.1)


def missing(what: str) -> NoReturn:
    """Skip for want of ``what``; in CI, fail instead: there the test must run."""
    if os.environ.get("CI"):
        pytest.fail(f"the database outage test must run in CI, but {what}")
    pytest.skip(what)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    bindir = postgres_bindir()
    if bindir is None:
        missing("no PostgreSQL server binaries (initdb, pg_ctl) were found")
    as_user: tuple[str, ...] = ()
    owner: tuple[int, int] | None = None
    if os.geteuid() == 0:
        # initdb refuses to run as root: run the server binaries as the postgres user, who owns the directory.
        runuser = shutil.which("runuser")
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            user = None
        if runuser is None or user is None:
            missing("running as root needs runuser and a postgres user to run PostgreSQL")
        as_user = (runuser, "-u", "postgres", "--")
        owner = (user.pw_uid, user.pw_gid)
    instance = PrivatePostgres(bindir, as_user, owner)
    try:
        instance.init()
        instance.start()
        yield instance
    finally:
        instance.close()


@dataclass(frozen=True)
class Call:
    kind: str
    started: float
    ended: float
    # None for success, else the status code the call failed with.
    code: grpc.StatusCode | None


@dataclass
class SteadyLoad:
    """Issue, verify and score at a steady pace, one thread per kind, recording every call."""

    target: str
    token: str
    calls: list[Call] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, number: str) -> None:
        kinds: dict[str, Callable[[posguard.Client, random.Random], Any]] = {
            "issue": lambda client, _: client.issue_customer_id(),
            "verify": lambda client, _: client.verify_customer_id(number=number),
            "score": lambda client, rng: client.score_transaction(
                score_request(new_transaction(number, rng))
            ),
        }
        for kind, call in kinds.items():
            thread = threading.Thread(target=self._run, args=(kind, call), name=f"load-{kind}", daemon=True)
            self.threads.append(thread)
            thread.start()

    def _run(self, kind: str, call: Callable[[posguard.Client, random.Random], Any]) -> None:
        rng = random.Random(kind)
        with posguard.Client(self.target, api_key=self.token, timeout=DEADLINE_S) as client:
            while not self.stop.is_set():
                started = time.monotonic()
                code: grpc.StatusCode | None = None
                try:
                    call(client, rng)
                except posguard.PosguardError as error:
                    code = error.code
                self.calls.append(Call(kind, started, time.monotonic(), code))
                time.sleep(0.02)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=DEADLINE_S + 10)
            assert not thread.is_alive(), "a call outlived its deadline"

    def between(self, start: float, end: float) -> list[Call]:
        return [c for c in list(self.calls) if c.started >= start and c.ended <= end]


def outage(
    database: PrivatePostgres, server: Served, load: SteadyLoad, mode: str, seconds: float
) -> tuple[float, dict[str, float]]:
    """Stop the database for ``seconds`` under load, start it again; (time to serve again, per call kind)."""
    stopping = time.monotonic()
    database.stop(mode)
    stopped = time.monotonic()
    while time.monotonic() - stopped < seconds:
        # The process stays up and its health stays answerable: it reports the service, not the database.
        assert server.process.poll() is None, "the server died with its database"
        assert health(server.target) == health_pb2.HealthCheckResponse.SERVING
        time.sleep(0.25)
    down = load.between(stopped, time.monotonic())
    assert len(down) >= 10, f"too little load while the database was down: {down}"
    assert all(c.code == grpc.StatusCode.UNAVAILABLE for c in down), Counter((c.kind, c.code) for c in down)
    assert {c.kind for c in down} == {"issue", "verify", "score"}
    database.start()
    back = time.monotonic()
    # Probe on a connection of its own, independent of the load's pace.
    with posguard.Client(server.target, api_key=load.token, timeout=DEADLINE_S) as probe:
        while True:
            try:
                probe.issue_customer_id()
                break
            except posguard.UnavailableError:
                assert time.monotonic() - back < RECOVERY_LIMIT_S + DEADLINE_S, "no recovery"
                time.sleep(0.05)
    recovered = time.monotonic() - back
    # Every kind of call succeeds again, and keeps succeeding: nothing broken lingers in the pool.
    first_success: dict[str, float] = {}
    deadline = time.monotonic() + RECOVERY_LIMIT_S
    while len(first_success) < 3 and time.monotonic() < deadline:
        for c in list(load.calls):
            if c.code is None and c.started >= back and c.kind not in first_success:
                first_success[c.kind] = c.ended - back
        time.sleep(0.05)
    settled = time.monotonic()
    time.sleep(1.0)
    after = load.between(settled, time.monotonic())
    assert after, "no calls after recovery"
    assert all(c.code is None for c in after), Counter((c.kind, c.code) for c in after)
    # Through the whole episode, calls failed only as UNAVAILABLE, and none hung past its deadline.
    episode = load.between(stopping, time.monotonic())
    assert {c.code for c in episode} <= {None, grpc.StatusCode.UNAVAILABLE}, Counter(c.code for c in episode)
    slowest = max(c.ended - c.started for c in episode)
    assert slowest <= DEADLINE_S + DEADLINE_SLACK_S, f"a call took {slowest:.2f}s"
    return recovered, first_success


def test_database_outage_is_unavailable_and_the_server_recovers(
    private_postgres: PrivatePostgres, tmp_path: Path, serve_process: ServeProcess, cli: Cli
) -> None:
    # A short auth cache: during the outage key lookups hit the database too, not only the handlers.
    flags = ("--database-url", private_postgres.url, "--auth-cache-seconds", "0.5")
    upgraded = cli("--data-dir", str(tmp_path), *flags, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    token = gateway_key(cli, tmp_path, flags)
    server = serve(serve_process, tmp_path, flags)
    with posguard.Client(server.target, api_key=token, timeout=DEADLINE_S) as client:
        number = client.issue_customer_id().customer.primary.number
    load = SteadyLoad(server.target, token)
    load.start(number)
    try:
        time.sleep(1.0)
        healthy = list(load.calls)
        assert healthy, "no calls while healthy"
        assert all(c.code is None for c in healthy), Counter(c.code for c in healthy)
        # A clean shutdown (clients are told) and a crash (connections just die).
        measured = {
            mode: outage(private_postgres, server, load, mode, seconds=3.0) for mode in ("fast", "immediate")
        }
    finally:
        load.finish()
    # Still the first process, and it shuts down cleanly; nothing was logged as an error on the way.
    assert server.end(signal.SIGTERM) == 0
    log = server.log.text()
    assert "Traceback" not in log
    assert not re.search(r"\b(ERROR|CRITICAL)\b", log), log
    print(f"\nrecovery after the database returned: {measured}; calls: {Counter(c.code for c in load.calls)}")
    for recovered, first_success in measured.values():
        assert recovered < RECOVERY_LIMIT_S, f"served again only {recovered:.2f}s after the database was back"
        assert set(first_success) == {"issue", "verify", "score"}, first_success
        assert max(first_success.values()) < RECOVERY_LIMIT_S, first_success
