"""What one scored transaction costs the database, and where the writer's time goes: round trips, batch sizes,
bytes and CPU, for docs/capacity.md and the README.

    .venv/bin/python bench/write_cost.py [--modes 1:200,64:3000] [--postgres URL]

Sets up a data directory as ``bench/rpc_bench.py`` does (sample history imported, models trained, a gateway
key), then builds the server in this process (``build_server``) with SQLAlchemy's ``before_cursor_execute``
counting every statement the engine sends (executemany or single, and its parameter sets), the gateway units'
driver connections (``store.driver``, which bypass the engine's events) counted the same way, and
``ScoringService.score_many`` wrapped to count the group-commit batches and their calls. A client in a
subprocess (this script again) drives ScoreTransaction over gRPC on loopback, ``calls`` calls with
``inflight`` in flight per mode, after a warm-up that loads every customer's model. Since the client runs
elsewhere, ``time.process_time()`` of this process is the server's CPU (with the counting hooks in it).

Storage growth per stored transaction: on SQLite, the database file plus its WAL after
``PRAGMA wal_checkpoint(TRUNCATE)``, before and after each mode; on PostgreSQL (``--postgres``, a server URL;
a fresh database is made), ``pg_total_relation_size`` of ``risk_transactions`` (heap, indexes) and
``risk_profiles``, and the WAL written (``pg_wal_lsn_diff`` of ``pg_current_wal_lsn()``; cluster-wide, so
anything else writing to the same server is counted too). On PostgreSQL it also reads, from /proc, the CPU of
the database's backends (the server's pooled connections; local PostgreSQL only), not the WAL writer's or
the checkpointer's. Round trips, on SQLite, are the statements plus each transaction's end (no network: the
count of calls into the library). On PostgreSQL they are the waits for the server: each statement sent
alone, each block of statements sent together (``DriverConnection.together``, psycopg's pipeline mode; a
result read inside the block adds one; a unit's BEGIN goes with its first statement, in a block of its own
when that statement is not in one), and COMMIT. Prints markdown tables: round trips per
mode, bytes per mode, the statements of an average batch by kind, and where a call's time goes.

Where the time goes: the writer thread's CPU inside ``score_many`` (``time.thread_time()``), split into the
calls into the driver (the unit's start, each statement's ``execute`` and, on PostgreSQL, the end of each
block sent together and each wait for a result inside one, where the block is sent and its results read),
the end of the unit (COMMIT and its sync to disk), and the rest: posguard's own Python and numpy (features,
forests, reasons, rows). The driver's calls and the end are also given in wall time: the drivers let go of
the interpreter lock while the database works, and taking it back beside a busy event loop is part of that
wall time. The process's CPU beyond the writer's is the event loop's (gRPC, the pipeline, the servicer) and
the other threads'.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from grpc import aio
from rpc_bench import SAMPLE, SCORE, Requests, _cli, _raw
from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url

from posguard_server.app import build_server
from posguard_server.config import Settings
from posguard_server.services.scoring import ScoreCall, Scoring, ScoringService
from posguard_server.store.db import Database, normalize_url
from posguard_server.store.driver import DriverConnection
from posguard_server.store.scratch import scratch_postgres_database

_TOKEN_ENV = "POSGUARD_BENCH_TOKEN"  # noqa: S105 (the name of a variable)
_TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+\"?(\w+)", re.IGNORECASE)
_WARM_UP_CALLS = 64
_TICKS = os.sysconf("SC_CLK_TCK")


# -- counting -----------------------------------------------------------------------------------------


@dataclass
class Counts:
    """What the engine sent, split into statements inside scoring batches and the rest."""

    statements: int = 0  # inside score_many
    executemany: int = 0
    parameter_sets: int = 0
    commits: int = 0
    rollbacks: int = 0
    batches: int = 0
    batch_calls: int = 0
    other_statements: int = 0  # outside score_many: authentication, the model generation, ...
    waits: int = 0  # PostgreSQL: round trips of the units inside score_many (see the module's docstring)
    kinds: Counter[str] = field(default_factory=Counter)
    # Seconds inside score_many: the writer's CPU, and by part of it ("statements", "end") CPU and wall time.
    writer_cpu: float = 0.0
    cpu: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    wall: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))


class Hooks:
    """Engine and scoring hooks feeding one ``Counts``, reset between modes."""

    def __init__(self) -> None:
        self.counts = Counts()
        self._lock = threading.Lock()
        self._local = threading.local()

    def reset(self) -> Counts:
        with self._lock:
            counts, self.counts = self.counts, Counts()
        return counts

    def _in_batch(self) -> bool:
        return bool(getattr(self._local, "in_batch", False))

    def attach(self, engine: Engine) -> None:
        def execute(
            conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
        ) -> None:
            self._count(statement, len(parameters) if executemany else None)

        def commit(conn: Any) -> None:
            if self._in_batch():
                with self._lock:
                    self.counts.commits += 1

        def rollback(conn: Any) -> None:
            if self._in_batch():
                with self._lock:
                    self.counts.rollbacks += 1

        event.listen(engine, "before_cursor_execute", execute)
        event.listen(engine, "commit", commit)
        event.listen(engine, "rollback", rollback)

    def _spent(self, part: str, cpu: float, wall: float) -> None:
        """Add the thread's CPU and the wall time since ``cpu`` and ``wall`` to ``part`` of a batch's time."""
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        if not self._in_batch():
            return
        with self._lock:
            self.counts.cpu[part] += cpu
            self.counts.wall[part] += wall

    def _count(self, statement: str, parameter_sets: int | None) -> None:
        """One statement sent; ``parameter_sets`` None for a single execution, else an executemany's."""
        with self._lock:
            c = self.counts
            if not self._in_batch():
                c.other_statements += 1
                return
            c.statements += 1
            c.kinds[_kind(statement, parameter_sets is not None)] += 1
            if parameter_sets is not None:
                c.executemany += 1
                c.parameter_sets += parameter_sets
            else:
                c.parameter_sets += 1

    def wrap_driver(self) -> None:
        """Count what the gateway units send through the driver itself (``store.driver``), which SQLAlchemy's
        events do not see: their statements, and each unit's BEGIN (SQLite's) and its end; on PostgreSQL,
        the waits for the server."""
        execute, unit = DriverConnection.execute, Database.statements_unit
        together, wait_for = DriverConnection.together, DriverConnection.wait_for
        texts: dict[tuple[int, str], str] = {}
        local = self._local

        def wait() -> None:
            if self._in_batch():
                with self._lock:
                    self.counts.waits += 1

        def counted_execute(connection: DriverConnection, statement: Any, parameters: Any = None) -> Any:
            postgresql = connection.dialect.name == "postgresql"
            if postgresql and getattr(local, "block", None) is None and not getattr(local, "begun", False):
                # As the driver sends it: a unit's first statement, outside a block, in a block of its own
                # with the unit's BEGIN.
                with counted_together(connection):
                    return counted_execute(connection, statement, parameters)
            key = (id(statement), connection.dialect.name)
            text = texts.get(key)
            if text is None:
                text = texts[key] = str(statement.compile(dialect=connection.dialect))
            # As SQLAlchemy's events count them: a list of one set of parameters is a single execution.
            many = (
                None
                if parameters is None or isinstance(parameters, dict) or len(parameters) == 1
                else len(parameters)
            )
            self._count(text, many)
            if postgresql:
                local.begun = True  # BEGIN goes in the block of the unit's first statement
                blocked = getattr(local, "block", None)
                if blocked is None:
                    wait()
                else:
                    blocked.append(statement)
            cpu, wall = time.thread_time(), time.perf_counter()
            try:
                return execute(connection, statement, parameters)
            finally:
                self._spent("statements", cpu, wall)

        @contextmanager
        def counted_together(connection: DriverConnection) -> Iterator[None]:
            if getattr(local, "block", None) is not None:  # within a block: part of it
                with together(connection):
                    yield
                return
            local.block = []
            ended: tuple[float, float] | None = None
            try:
                with together(connection):
                    yield
                    ended = time.thread_time(), time.perf_counter()  # from here: the block sent, results read
            finally:
                if ended is not None:
                    self._spent("statements", *ended)
                sent, local.block = local.block, None
                if sent and connection.dialect.name == "postgresql":
                    wait()

        def counted_wait_for(connection: DriverConnection, batch: int) -> None:
            before = getattr(connection, "_batch")  # noqa: B009 (the driver's own count of syncs)
            cpu, wall = time.thread_time(), time.perf_counter()
            try:
                wait_for(connection, batch)  # a result asked for inside its block: the block sent and read
            finally:
                self._spent("statements", cpu, wall)
            if getattr(connection, "_batch") != before:  # noqa: B009
                wait()

        @contextmanager
        def counted_unit(database: Database) -> Iterator[Any]:
            if database.dialect == "sqlite":
                self._count("BEGIN IMMEDIATE", None)  # a statement there; psycopg's BEGIN is counted apart
            committed = False
            local.begun = False
            ended: tuple[float, float] | None = None
            try:
                begun = time.thread_time(), time.perf_counter()
                with unit(database) as connection:
                    self._spent("statements", *begun)  # the unit's start: BEGIN, on PostgreSQL a checkout
                    yield connection
                    ended = time.thread_time(), time.perf_counter()  # what runs from here is the unit's end
                committed = True
            finally:
                if ended is not None:
                    self._spent("end", *ended)
                if database.dialect != "sqlite":
                    wait()  # COMMIT or ROLLBACK
                if self._in_batch():
                    with self._lock:
                        if committed:
                            self.counts.commits += 1
                        else:
                            self.counts.rollbacks += 1

        setattr(DriverConnection, "execute", counted_execute)  # noqa: B010 (mypy forbids assigning a method)
        setattr(DriverConnection, "together", counted_together)  # noqa: B010
        setattr(DriverConnection, "wait_for", counted_wait_for)  # noqa: B010
        setattr(Database, "statements_unit", counted_unit)  # noqa: B010

    def wrap_scoring(self) -> None:
        """Count the batches: the group-commit writers call ``score_many`` once per batch (patch before
        ``build_server``, which binds it)."""
        original = ScoringService.score_many

        def score_many(service: ScoringService, calls: Sequence[ScoreCall]) -> list[Scoring]:
            self._local.in_batch = True
            cpu = time.thread_time()
            try:
                return original(service, calls)
            finally:
                self._local.in_batch = False
                with self._lock:
                    self.counts.batches += 1
                    self.counts.batch_calls += len(calls)
                    self.counts.writer_cpu += time.thread_time() - cpu

        setattr(ScoringService, "score_many", score_many)  # noqa: B010 (mypy forbids assigning a method)


def _kind(statement: str, executemany: bool) -> str:
    words = statement.split(None, 1)
    op = words[0].upper() if words else "?"
    table = _TABLE.search(statement)
    name = f"{op} {table.group(1)}" if table else op
    if op == "SELECT" and "FOR NO KEY UPDATE" in statement:
        name += " FOR NO KEY UPDATE"
    if op == "INSERT" and re.search(r"VALUES\s*\(.*\)\s*,\s*\(", statement, re.DOTALL):
        name += " (multi-row VALUES)"
    return name + (" (executemany)" if executemany else "")


# -- storage ------------------------------------------------------------------------------------------


@dataclass
class Sizes:
    transactions: int  # rows in risk_transactions
    tx_heap: int = 0
    tx_indexes: int = 0
    tx_total: int = 0
    profiles_total: int = 0
    wal_lsn: str = ""
    backend_cpu: float = 0.0  # PostgreSQL: CPU seconds of this database's backends so far (from /proc)
    file_bytes: int = 0  # SQLite: database file + WAL after a truncating checkpoint


class SqliteSizes:
    def __init__(self, path: Path) -> None:
        self._path = path

    def read(self) -> Sizes:
        with sqlite3.connect(self._path, timeout=30) as connection:
            busy, _, _ = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy:
                raise RuntimeError("the checkpoint was blocked by a reader")
            (rows,) = connection.execute("SELECT count(*) FROM risk_transactions").fetchone()
        connection.close()
        wal = self._path.with_name(self._path.name + "-wal")
        size = self._path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
        return Sizes(transactions=rows, file_bytes=size)


class PostgresSizes:
    def __init__(self, url: str) -> None:
        self._dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)

    def read(self) -> Sizes:
        with psycopg.connect(self._dsn, autocommit=True) as connection:
            row = connection.execute(
                "SELECT (SELECT count(*) FROM risk_transactions), pg_relation_size('risk_transactions'), "
                "pg_indexes_size('risk_transactions'), pg_total_relation_size('risk_transactions'), "
                "pg_total_relation_size('risk_profiles'), pg_current_wal_lsn()::text"
            ).fetchone()
            assert row is not None
            backends = connection.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            ).fetchall()
        rows, heap, indexes, total, profiles, lsn = row
        cpu = sum(_cpu_seconds(pid) for (pid,) in backends)
        return Sizes(rows, heap, indexes, total, profiles, wal_lsn=lsn, backend_cpu=cpu)

    def wal_bytes(self, before: Sizes, after: Sizes) -> int:
        with psycopg.connect(self._dsn, autocommit=True) as connection:
            row = connection.execute(
                "SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)", (after.wal_lsn, before.wal_lsn)
            ).fetchone()
            assert row is not None
        return int(row[0])


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (0 if it is gone or not visible: PostgreSQL on another machine)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


# -- the client (a subprocess) ------------------------------------------------------------------------


async def client(port: int, inflight: int, calls: int) -> dict[str, float]:
    """``calls`` ScoreTransaction calls with ``inflight`` in flight; wall seconds and latency quantiles."""
    metadata = (("authorization", f"Bearer {os.environ[_TOKEN_ENV]}"),)
    requests = Requests().scores(calls)
    latencies: list[float] = []
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(SCORE, request_serializer=_raw, response_deserializer=_raw)
        feed = iter(requests)

        async def worker() -> None:
            for request in feed:
                began = time.perf_counter()
                await call(request, metadata=metadata, timeout=60)
                latencies.append(time.perf_counter() - began)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        seconds = time.perf_counter() - began
    ordered = sorted(latencies)
    return {
        "calls": len(ordered),
        "seconds": seconds,
        "p50_ms": 1000 * ordered[len(ordered) // 2],
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
    }


async def run_client(port: int, token: str, inflight: int, calls: int) -> dict[str, float]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--client-port",
        str(port),
        "--modes",
        f"{inflight}:{calls}",
        env={**os.environ, _TOKEN_ENV: token},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the client failed ({process.returncode})")
    result: dict[str, float] = json.loads(out)
    return result


# -- the run ------------------------------------------------------------------------------------------


@dataclass
class Mode:
    storage: str
    inflight: int
    client: dict[str, float]
    cpu_seconds: float
    counts: Counts
    before: Sizes
    after: Sizes
    wal_bytes: int | None  # PostgreSQL only

    @property
    def stored(self) -> int:
        return self.after.transactions - self.before.transactions

    @property
    def round_trips(self) -> int:
        """SQLite: statements with each transaction's end (``BEGIN IMMEDIATE`` is a statement already).
        PostgreSQL: the waits counted (see the module's docstring)."""
        c = self.counts
        if self.storage == "PostgreSQL":
            return c.waits
        return c.statements + c.commits + c.rollbacks

    @property
    def backend_cpu_ms(self) -> str:
        if self.storage != "PostgreSQL":
            return "—"
        return f"{1000 * (self.after.backend_cpu - self.before.backend_cpu) / self.client['calls']:.3f}"


def prepare(data_dir: Path, database_url: str | None) -> tuple[Settings, str]:
    """A data directory with the sample imported, models trained and a gateway key (via the CLI)."""
    flags = ["--data-dir", str(data_dir), "--log-level", "WARNING", "--no-metrics-enabled"]
    if database_url:
        flags += ["--database-url", database_url]
        _cli(flags, "db", "upgrade")
    _cli(flags, "import", "transactions", str(SAMPLE))
    _cli(flags, "train")
    token = json.loads(_cli(flags, "keys", "create", "--role", "gateway", "--json"))["token"]
    settings = Settings(
        data_dir=data_dir,
        database_url=database_url,
        listen="127.0.0.1:0",
        log_level="WARNING",
        metrics_enabled=False,
        max_concurrent_rpcs=100_000,
    )
    return settings, token


async def measure_storage(
    storage: str,
    settings: Settings,
    token: str,
    modes: list[tuple[int, int]],
    hooks: Hooks,
    read_sizes: Callable[[], Sizes],
    wal: Callable[[Sizes, Sizes], int] | None,
) -> list[Mode]:
    server, port = build_server(settings)
    hooks.attach(server.database.engine)
    await server.start()
    results = []
    try:
        await run_client(port, token, 8, _WARM_UP_CALLS)  # every customer's model loaded, pools filled
        for inflight, calls in modes:
            before = read_sizes()
            hooks.reset()
            cpu = time.process_time()
            answered = await run_client(port, token, inflight, calls)
            cpu = time.process_time() - cpu
            counts = hooks.reset()
            after = read_sizes()
            results.append(
                Mode(
                    storage,
                    inflight,
                    answered,
                    cpu,
                    counts,
                    before,
                    after,
                    wal(before, after) if wal is not None else None,
                )
            )
            print(
                f"{storage} {inflight} in flight: {answered['calls'] / answered['seconds']:,.0f}/s",
                file=sys.stderr,
            )
    finally:
        await server.stop(1)
    return results


async def measure(args: argparse.Namespace) -> list[Mode]:
    hooks = Hooks()
    hooks.wrap_scoring()
    hooks.wrap_driver()
    results: list[Mode] = []
    with tempfile.TemporaryDirectory(prefix="posguard-write-cost-") as tmp:
        settings, token = prepare(Path(tmp) / "sqlite", None)
        sqlite = SqliteSizes(Path(make_url(settings.effective_database_url).database or ""))
        results += await measure_storage("SQLite", settings, token, args.modes, hooks, sqlite.read, None)
        if args.postgres:
            with scratch_postgres_database(args.postgres, "posguard_write_cost") as url:
                settings, token = prepare(Path(tmp) / "pg", url)
                pg = PostgresSizes(normalize_url(url))
                results += await measure_storage(
                    "PostgreSQL", settings, token, args.modes, hooks, pg.read, pg.wal_bytes
                )
    return results


# -- report -------------------------------------------------------------------------------------------


def _per(value: float, count: int) -> str:
    return f"{value / count:,.2f}" if count else "—"


def _ms(seconds: float, count: int) -> str:
    return f"{1000 * seconds / count:.3f}" if count else "—"


def _bytes(value: int, count: int) -> str:
    return f"{value / count:,.0f}" if count else "—"


def markdown(modes: list[Mode]) -> str:
    lines = [
        "| storage | in flight | calls | calls/s | server CPU ms/call | batches | calls per batch "
        "| statements per batch | round trips per batch | round trips per call | executemany per batch "
        "| parameter sets per call | commits / rollbacks | statements outside batches "
        "| PostgreSQL backend CPU ms/call |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in modes:
        c, calls = m.counts, int(m.client["calls"])
        lines.append(
            f"| {m.storage} | {m.inflight} | {calls:,} | {calls / m.client['seconds']:,.0f} "
            f"| {_ms(m.cpu_seconds, calls)} | {c.batches:,} | {_per(c.batch_calls, c.batches)} "
            f"| {_per(c.statements, c.batches)} | {_per(m.round_trips, c.batches)} "
            f"| {_per(m.round_trips, c.batch_calls)} "
            f"| {_per(c.executemany, c.batches)} | {_per(c.parameter_sets, c.batch_calls)} "
            f"| {c.commits:,} / {c.rollbacks:,} | {c.other_statements:,} | {m.backend_cpu_ms} |"
        )
    lines += [
        "",
        "| storage | in flight | transactions stored | database file + WAL bytes/txn (SQLite) "
        "| risk_transactions heap / indexes / total bytes/txn | risk_profiles bytes/txn | WAL bytes/txn |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in modes:
        b, a, n = m.before, m.after, m.stored
        if m.storage == "SQLite":
            sizes = f"| {_bytes(a.file_bytes - b.file_bytes, n)} | — | — | — |"
        else:
            assert m.wal_bytes is not None
            sizes = (
                f"| — | {_bytes(a.tx_heap - b.tx_heap, n)} / {_bytes(a.tx_indexes - b.tx_indexes, n)} / "
                f"{_bytes(a.tx_total - b.tx_total, n)} | {_bytes(a.profiles_total - b.profiles_total, n)} "
                f"| {_bytes(m.wal_bytes, n)} |"
            )
        lines.append(f"| {m.storage} | {m.inflight} | {n:,} {sizes}")
    lines += [
        "",
        "| storage | in flight | calls/s | server CPU ms/call | writer CPU ms/call "
        "| of it: the driver's calls (CPU / wall) | the unit's end (CPU / wall) | the rest of the writer "
        "| outside the writer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in modes:
        c, calls = m.counts, int(m.client["calls"])
        rest = c.writer_cpu - c.cpu["statements"] - c.cpu["end"]
        lines.append(
            f"| {m.storage} | {m.inflight} | {calls / m.client['seconds']:,.0f} "
            f"| {_ms(m.cpu_seconds, calls)} | {_ms(c.writer_cpu, calls)} "
            f"| {_ms(c.cpu['statements'], calls)} / {_ms(c.wall['statements'], calls)} "
            f"| {_ms(c.cpu['end'], calls)} / {_ms(c.wall['end'], calls)} | {_ms(rest, calls)} "
            f"| {_ms(m.cpu_seconds - c.writer_cpu, calls)} |"
        )
    kinds = sorted({kind for m in modes for kind in m.counts.kinds})
    lines += [
        "",
        "| statement (per batch) | "
        + " | ".join(f"{m.storage}, {m.inflight} in flight" for m in modes)
        + " |",
        "|---|" + "---|" * len(modes),
    ]
    for kind in kinds:
        cells = " | ".join(_per(m.counts.kinds[kind], m.counts.batches) for m in modes)
        lines.append(f"| `{kind}` | {cells} |")
    return "\n".join(lines)


def _modes(text: str) -> list[tuple[int, int]]:
    pairs = [part.split(":") for part in text.split(",")]
    return [(int(inflight), int(calls)) for inflight, calls in pairs]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--modes",
        type=_modes,
        default=[(1, 200), (64, 3000)],
        help="in flight:calls, ... (e.g. 1:200,64:3000)",
    )
    parser.add_argument("--postgres", default="", help="PostgreSQL server URL; a fresh database is made")
    parser.add_argument("--client-port", type=int, help=argparse.SUPPRESS)  # run as the load client
    args = parser.parse_args()
    if args.client_port is not None:
        ((inflight, calls),) = args.modes
        print(json.dumps(asyncio.run(client(args.client_port, inflight, calls))))
        return
    print(markdown(asyncio.run(measure(args))))


if __name__ == "__main__":
    main()
