"""posguard's RPCs against the gRPC ceiling, measured in the same run on the same machine.

    .venv/bin/python bench/rpc_bench.py [--seconds 5] [--repeats 3] [--inflight 1,8,64] [--postgres URL]
        [--only score,stream,verify,redeem,issue,code,resolve,miss] [--py-spy DIR [--py-spy-gil]] [--rules N]
        [--rules-firing K]

Sets up a server the way an operator would (import the sample history, train, create a gateway key), starts it
and an echo server (``bench/echo_server.py``: the same gRPC stack on the same event loop, a handler that does
nothing, replies of the size posguard sends), and measures each in turn with the same load generator: ``N``
calls in flight for ``--seconds``, requests serialised in advance and replies left unparsed, so the client
costs the same for both. Reports throughput, p50/p99 latency, the server's CPU per call and the context
switches of its threads per call (the kernel's count: a thread woken or made to wait, for the interpreter lock
or a socket, is switched off its core), each the median over ``--repeats`` windows, with posguard's ratio to
the echo baseline, and the disk's fsync latency measured in the same run. ``--postgres`` (a server URL) adds
ScoreTransaction on a fresh PostgreSQL database. ``--only`` measures some of the RPCs (``miss``, not measured
by default: ResolveExternalId of external ids nobody was linked to, each a miss counted against the key under
a limit no window reaches, and audited). ``--rules N`` measures ScoreTransaction on SQLite without rules and
with ``N`` active rules (``bench_rules``: every kind of variable, with thresholds the benchmark's traffic does
not reach; ``--rules-firing K`` lowers the thresholds of K velocity rules and K rules on the model's score to
what it reaches), alternating window by window on one server in ABBA order, and reports the server CPU per
call of each, their ratio, the median and quartiles of the ratios of neighbouring windows, and the share of
answers a rule fired on (every 20th answer of the windows with rules). ``--py-spy DIR`` records each posguard
server under ``py-spy`` (which must be on PATH) into ``DIR/<storage>.txt`` as collapsed stacks, for
``bench/profile_top.py``; with ``--py-spy-gil``, only the thread holding the interpreter lock, which is where
the CPU of a server bound by that lock goes. Linux only (server CPU and switches are read from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc import aio

from posguard import Client, dynamic_code
from posguard.errors import FailedPreconditionError, NotFoundError
from posguard.v1 import common_pb2, customer_ids_pb2, policy_pb2, risk_pb2
from posguard_server.pipeline.importer import DEFAULT_NAMESPACE, read_transactions
from posguard_server.store.scratch import scratch_postgres_database

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "handbook_sample.csv.gz"
SERVER = [sys.executable, "-m", "posguard_server"]
SCORE = "/posguard.v1.Risk/ScoreTransaction"
SCORE_STREAM = "/posguard.v1.Risk/ScoreTransactions"
VERIFY = "/posguard.v1.CustomerIds/VerifyCustomerId"
REDEEM = "/posguard.v1.CustomerIds/RedeemDynamicCode"
ISSUE = "/posguard.v1.CustomerIds/IssueCustomerId"
ISSUE_CODE = "/posguard.v1.CustomerIds/IssueDynamicCode"
RESOLVE = "/posguard.v1.CustomerIds/ResolveExternalId"
ECHO, ECHO_STREAM = "/bench.Echo/Unary", "/bench.Echo/Stream"
_TICKS = os.sysconf("SC_CLK_TCK")
ADMIN_TOKEN = ""  # an admin key of the server ``posguard`` started last (rules are an admin's)
# The rules' templates: every kind of variable a rule reads (the transaction, the counters, new places, the
# numbers' signals, the model's score), with thresholds that few of the benchmark's transactions reach.
RULE_TEMPLATES = (
    "txn.amount > {big} && txn.mcc in ['7995', '{mcc}']",
    "customer.count_10m > {count} && txn.channel == 'online'",
    "risk_score > 0.995 && customer.spend_24h > {spend}",
    "txn.hour == {hour} && txn.amount > {big}",
    "customer.new_terminal && txn.amount > {big}",
    "number.failed_verifications > {count} || customer.count_1h > {many}",
    "txn.currency != 'EUR' && customer.spend_1h > {big}",
)


def bench_rules(n: int, firing: int = 0) -> list[tuple[str, str]]:
    """``n`` (name, condition) pairs made from ``RULE_TEMPLATES`` in turn.

    Each of the benchmark's 30 customers pays every 30 seconds: within a window a customer's count of the last
    hour climbs to 64 (the most a profile keeps), and the model scores most of these payments at 0.995 or
    more. The thresholds sit above what this traffic reaches, as an operator sets them above normal traffic,
    except in the first ``firing`` rules of the velocity and model-score templates, whose thresholds (a count
    of 45, 52, 59, ... in the last hour; a day's spend of 2,074, 2,333, ...) it reaches: those fire and add
    their reasons. ``firing`` 7 of 50 is the rule set earlier releases of this benchmark measured.
    """
    return [
        (
            f"BENCH_{i:03d}",
            RULE_TEMPLATES[i % len(RULE_TEMPLATES)].format(
                big=2_000 + 37 * i,
                spend=2_000 + 37 * i if low else 100_000 + 370 * i,
                mcc=6000 + i,
                count=5 + i % 7,
                hour=i % 24,
                many=40 + i if low else 70 + i,
            ),
        )
        for i in range(n)
        for low in (i // len(RULE_TEMPLATES) < firing,)
    ]


def set_rules(port: int, rules: list[tuple[str, str]], active: bool) -> None:
    """Activate (a new draft version of) each rule, or retire each; then wait out the servers' refresh."""
    with Client(f"127.0.0.1:{port}", api_key=ADMIN_TOKEN, timeout=30) as client:
        for name, condition in rules:
            if active:
                client.create_rule(
                    name=name, condition=condition, action=policy_pb2.RULE_ACTION_REVIEW, reason="benchmark"
                )
                client.activate_rule(name=name, reason="benchmark")
            else:
                # Before the first window with rules they do not exist yet.
                with contextlib.suppress(NotFoundError, FailedPreconditionError):
                    client.retire_rule(name=name, reason="benchmark")
    time.sleep(6.0)  # past model_refresh_seconds (5 s by default): every call of the window sees the change


MakeRequests = Callable[[int], list[bytes]]


def _raw(data: bytes) -> bytes:
    return data


# -- servers ------------------------------------------------------------------------------------------


@dataclass
class Process:
    popen: subprocess.Popen[str]
    port: int

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime

    def context_switches(self) -> int:
        """The times the process's threads have been switched off a core so far, voluntarily or not."""
        switches = 0
        for status in Path(f"/proc/{self.popen.pid}/task").glob("*/status"):
            try:
                text = status.read_text()
            except OSError:  # a thread that ended meanwhile
                continue
            for line in text.splitlines():
                if "ctxt_switches:" in line:  # voluntary_ and nonvoluntary_
                    switches += int(line.split()[1])
        return switches

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            self.popen.kill()


def _start(args: list[str], pattern: str, env: dict[str, str] | None = None) -> Process:
    popen = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
    )
    assert popen.stdout is not None
    deadline = time.monotonic() + 60
    for line in popen.stdout:
        match = re.search(pattern, line)
        if match:
            # Keep draining the output so the server never blocks on a full pipe.
            _drain(popen)
            return Process(popen, int(match.group(1)))
        if time.monotonic() > deadline:
            break
    popen.kill()
    raise RuntimeError(f"{args[-1]} did not start")


def _drain(popen: subprocess.Popen[str]) -> None:
    def run() -> None:
        assert popen.stdout is not None
        for _ in popen.stdout:
            pass

    threading.Thread(target=run, daemon=True).start()


def _cli(settings: list[str], *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [*SERVER, *settings, *args], capture_output=True, text=True, cwd=ROOT, check=False, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"posguard-server {' '.join(args)} failed: {done.stderr[-2000:]}")
    return done.stdout


@contextmanager
def posguard(
    data_dir: Path,
    database_url: str | None,
    *flags: str,
    profile: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[Process, str]]:
    """A trained posguard server (log level WARNING, no metrics, ``flags`` added) and a gateway key.

    Load shedding is off unless ``flags`` set it: this measures how much a server serves, not what it refuses.
    With ``profile``, py-spy records the server's stacks there until it stops. ``env``: the environment of
    the server and its set-up commands (``bench/revisions_ab.py`` points ``PYTHONPATH`` at another revision).
    """
    no_shedding = ["--max-concurrent-rpcs", "100000"]
    settings = ["--data-dir", str(data_dir), "--log-level", "WARNING", "--no-metrics-enabled", *no_shedding]
    settings += flags
    if database_url:
        settings += ["--database-url", database_url]
        _cli(settings, "db", "upgrade", env=env)
    _cli(settings, "import", "transactions", str(SAMPLE), env=env)
    _cli(settings, "train", env=env)
    token = json.loads(_cli(settings, "keys", "create", "--role", "gateway", "--json", env=env))["token"]
    global ADMIN_TOKEN
    ADMIN_TOKEN = json.loads(_cli(settings, "keys", "create", "--role", "admin", "--json", env=env))["token"]
    process = _start(
        [*SERVER, *settings, "--listen", "127.0.0.1:0", "--log-level", "INFO", "serve"],
        r"posguard serving on 127\.0\.0\.1:(\d+)",
        env=env,
    )
    spy = _py_spy(process, profile) if profile is not None else None
    try:
        yield process, token
    finally:
        process.stop()
        if spy is not None:
            spy.wait(60)


PY_SPY_FLAGS: list[str] = []  # what --py-spy-gil adds


def _py_spy(process: Process, output: Path) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--py-spy needs py-spy on PATH")
    output.parent.mkdir(parents=True, exist_ok=True)
    command = [spy, "record", *PY_SPY_FLAGS, "--pid", str(process.popen.pid), "--format", "raw"]
    return subprocess.Popen(
        [*command, "--output", str(output)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@contextmanager
def echo(reply_bytes: int) -> Iterator[Process]:
    process = _start(
        [sys.executable, str(ROOT / "bench" / "echo_server.py"), "--reply-bytes", str(reply_bytes)],
        r"echo serving on (\d+)",
    )
    try:
        yield process
    finally:
        process.stop()


# -- requests -----------------------------------------------------------------------------------------


class Requests:
    """Serialised requests: transactions of the sample's customers after its history, and their numbers."""

    def __init__(self) -> None:
        rows = list(read_transactions(SAMPLE))
        self.refs = sorted({r.customer_ref for r in rows})
        self.start = max(r.transaction.event_time for r in rows)
        self.run = secrets.token_hex(4)
        self.made = 0
        self.numbers: list[str] = []
        self.secrets: list[str] = []  # dynamic-code secrets of the numbers' customers

    def transaction(self) -> risk_pb2.Transaction:
        i = self.made
        self.made += 1
        txn = risk_pb2.Transaction(
            transaction_id=f"bench-{self.run}-{i}",
            external_id=common_pb2.ExternalId(
                namespace=DEFAULT_NAMESPACE, value=self.refs[i % len(self.refs)]
            ),
            amount=common_pb2.Money(amount_minor=1_000 + (i * 7919) % 90_000, currency="EUR"),
            merchant_id=f"T{i % 500:06d}",
            terminal_id=f"T{i % 500:06d}",
            channel=common_pb2.CHANNEL_POS,
        )
        txn.event_time.FromDatetime(self.start + timedelta(seconds=i))
        return txn

    def scores(self, n: int) -> list[bytes]:
        return [
            risk_pb2.ScoreTransactionRequest(transaction=self.transaction()).SerializeToString()
            for _ in range(n)
        ]

    def stream_items(self, n: int) -> list[bytes]:
        return [
            risk_pb2.ScoreTransactionsRequest(transaction=self.transaction()).SerializeToString()
            for _ in range(n)
        ]

    def verifies(self, n: int) -> list[bytes]:
        return [
            customer_ids_pb2.VerifyCustomerIdRequest(
                number=self.numbers[i % len(self.numbers)]
            ).SerializeToString()
            for i in range(n)
        ]

    def redemptions(self, n: int) -> list[bytes]:
        """Codes of the current step, customer after customer: each customer's first pays, the rest are
        refused as already used (a customer's device shows one code a minute); each is judged, recorded
        and audited alike."""
        codes = [dynamic_code(secret) for secret in self.secrets]
        self.made += n
        return [
            customer_ids_pb2.RedeemDynamicCodeRequest(
                request_id=f"bench-{self.run}-{self.made}-{i}",
                code=codes[i % len(codes)],
                merchant_id=f"T{i % 500:06d}",
            ).SerializeToString()
            for i in range(n)
        ]

    def issues(self, n: int) -> list[bytes]:
        """New customers, each under its own request_id and with an external id of its own, as a gateway
        onboarding customers sends them; each makes a customer, a number, a link and an audit event."""
        self.made += n
        return [
            customer_ids_pb2.IssueCustomerIdRequest(
                request_id=f"bench-{self.run}-{self.made}-{i}",
                external_ids=[common_pb2.ExternalId(namespace="bench", value=f"{self.run}-{self.made}-{i}")],
            ).SerializeToString()
            for i in range(n)
        ]

    def resolves(self, n: int) -> list[bytes]:
        """The sample's customers looked up by their external ids, as a gateway finds the customer (its
        number and links) of an account of its own."""
        return [
            customer_ids_pb2.ResolveExternalIdRequest(
                external_id=common_pb2.ExternalId(
                    namespace=DEFAULT_NAMESPACE, value=self.refs[i % len(self.refs)]
                )
            ).SerializeToString()
            for i in range(n)
        ]

    def misses(self, n: int) -> list[bytes]:
        """External ids nobody was linked to, each a lookup miss counted against the key and audited, as a
        gateway whose accounts are not all known to posguard, or a key that guesses, sends them."""
        self.made += n
        return [
            customer_ids_pb2.ResolveExternalIdRequest(
                external_id=common_pb2.ExternalId(
                    namespace="bench", value=f"nobody-{self.run}-{self.made}-{i}"
                )
            ).SerializeToString()
            for i in range(n)
        ]

    def code_issues(self, n: int) -> list[bytes]:
        """Server-issued dynamic codes for the enrolled customers' numbers, customer after customer."""
        self.made += n
        return [
            customer_ids_pb2.IssueDynamicCodeRequest(
                request_id=f"bench-{self.run}-{self.made}-{i}", number=self.numbers[i % len(self.numbers)]
            ).SerializeToString()
            for i in range(n)
        ]


async def _call_each(
    port: int, token: str, method: str, reply: type[Message], requests: list[Message]
) -> list[Any]:
    """Send ``requests`` to ``method`` one after the other (setting up, not measured); the replies."""
    metadata = (("authorization", f"Bearer {token}"),)
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            method, request_serializer=lambda m: m.SerializeToString(), response_deserializer=reply.FromString
        )
        return [await call(request, metadata=metadata, timeout=10) for request in requests]


async def enroll(port: int, token: str, numbers: list[str]) -> list[str]:
    """Enrol each number's customer for dynamic codes; their secrets."""
    requests = [
        customer_ids_pb2.EnrollDynamicCodesRequest(request_id=f"enrol-{n}", number=n) for n in numbers
    ]
    replies = await _call_each(
        port,
        token,
        "/posguard.v1.CustomerIds/EnrollDynamicCodes",
        customer_ids_pb2.EnrollDynamicCodesResponse,
        list(requests),
    )
    return [reply.secret for reply in replies]


async def fetch_numbers(port: int, token: str, refs: list[str]) -> list[str]:
    requests = [
        customer_ids_pb2.GetCustomerRequest(
            customer=common_pb2.CustomerSelector(
                external_id=common_pb2.ExternalId(namespace=DEFAULT_NAMESPACE, value=ref)
            )
        )
        for ref in refs
    ]
    replies = await _call_each(
        port,
        token,
        "/posguard.v1.CustomerIds/GetCustomer",
        customer_ids_pb2.GetCustomerResponse,
        list(requests),
    )
    return [reply.customer.primary.number for reply in replies]


# -- load ---------------------------------------------------------------------------------------------


@dataclass
class Window:
    calls: int
    seconds: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_call: float
    max_ms: float  # the slowest call
    switches_per_call: float  # the server's threads switched off a core (the kernel's count), per call

    @property
    def rate(self) -> float:
        return self.calls / self.seconds


def _quiet_heap() -> None:
    """Collect and freeze the load generator's heap before a window: its own full collections (tens of
    milliseconds) would otherwise show as slow calls of whichever server it was measuring."""
    gc.collect()
    gc.freeze()


async def unary_window(
    process: Process,
    method: str,
    token: str,
    requests: list[bytes],
    inflight: int,
    seconds: float,
    replies: list[bytes] | None = None,
    answered: grpc.StatusCode = grpc.StatusCode.OK,
) -> Window:
    """One measured window; with ``replies``, every 20th reply is kept there (parsed after the window).

    ``answered``: the status every call is expected to end with (NOT_FOUND for misses).
    """
    metadata = (("authorization", f"Bearer {token}"),)
    latencies: list[float] = []
    _quiet_heap()
    async with aio.insecure_channel(f"127.0.0.1:{process.port}") as channel:
        call = channel.unary_unary(method, request_serializer=_raw, response_deserializer=_raw)

        async def one(request: bytes) -> bytes:
            try:
                reply: bytes = await call(request, metadata=metadata, timeout=30)
            except aio.AioRpcError as error:
                if error.code() != answered:
                    raise
                return b""
            return reply

        await one(requests[0])  # connect and warm up outside the window
        feed = iter(requests[1:])
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            for request in feed:
                if time.perf_counter() >= stop:
                    return
                began = time.perf_counter()
                reply = await one(request)
                latencies.append(time.perf_counter() - began)
                if replies is not None and len(latencies) % 20 == 0:
                    replies.append(reply)

        cpu, switches = process.cpu_seconds(), process.context_switches()
        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        elapsed = time.perf_counter() - began
        cpu, switches = process.cpu_seconds() - cpu, process.context_switches() - switches
    return _window(latencies, elapsed, cpu, switches)


async def stream_window(
    process: Process, method: str, token: str, requests: list[bytes], seconds: float
) -> Window:
    metadata = (("authorization", f"Bearer {token}"),)
    sent: list[float] = []
    latencies: list[float] = []
    _quiet_heap()
    async with aio.insecure_channel(f"127.0.0.1:{process.port}") as channel:
        stream = channel.stream_stream(method, request_serializer=_raw, response_deserializer=_raw)
        stop = time.perf_counter() + seconds

        async def items() -> AsyncIterator[bytes]:
            for request in requests:
                if time.perf_counter() >= stop:
                    return
                sent.append(time.perf_counter())
                yield request

        cpu, switches = process.cpu_seconds(), process.context_switches()
        began = time.perf_counter()
        call = stream(items(), metadata=metadata, timeout=seconds + 60)
        # Flow control lets the client queue far more than a slow server answers in the window: count the
        # replies of the window and cancel the rest, or the window would last as long as the backlog.
        async for _ in call:
            latencies.append(time.perf_counter() - sent[len(latencies)])
            if time.perf_counter() >= stop:
                break
        elapsed = time.perf_counter() - began
        cpu, switches = process.cpu_seconds() - cpu, process.context_switches() - switches
        call.cancel()
    return _window(latencies, elapsed, cpu, switches)


def _window(latencies: list[float], elapsed: float, cpu: float, switches: int) -> Window:
    if not latencies:
        raise RuntimeError("no call completed in the window")
    ordered = sorted(latencies)
    return Window(
        calls=len(ordered),
        seconds=elapsed,
        p50_ms=1000 * ordered[len(ordered) // 2],
        p99_ms=1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        cpu_ms_per_call=1000 * cpu / len(ordered),
        max_ms=1000 * ordered[-1],
        switches_per_call=switches / len(ordered),
    )


# -- report -------------------------------------------------------------------------------------------


@dataclass
class Row:
    rpc: str
    storage: str
    inflight: str
    echo_rate: float
    rate: float
    ratio: float
    echo_p50_ms: float
    p50_ms: float
    echo_p99_ms: float
    p99_ms: float
    echo_cpu_ms: float
    cpu_ms: float
    echo_switches: float
    switches: float


def _median(windows: list[Window], value: Callable[[Window], float]) -> float:
    return statistics.median(value(w) for w in windows)


def row(rpc: str, storage: str, inflight: str, base: list[Window], ours: list[Window]) -> Row:
    echo_rate = _median(base, lambda w: w.rate)
    rate = _median(ours, lambda w: w.rate)
    # Ratios are per repeat (echo and posguard measured back to back), then the median.
    ratio = statistics.median(o.rate / b.rate for o, b in zip(ours, base, strict=True))
    return Row(
        rpc,
        storage,
        inflight,
        echo_rate,
        rate,
        ratio,
        _median(base, lambda w: w.p50_ms),
        _median(ours, lambda w: w.p50_ms),
        _median(base, lambda w: w.p99_ms),
        _median(ours, lambda w: w.p99_ms),
        _median(base, lambda w: w.cpu_ms_per_call),
        _median(ours, lambda w: w.cpu_ms_per_call),
        _median(base, lambda w: w.switches_per_call),
        _median(ours, lambda w: w.switches_per_call),
    )


def fsync_ms(directory: Path, syncs: int = 200) -> tuple[float, float]:
    """p50 and p99 ms of appending 4 KiB to a file and syncing it, in ``directory`` (the database's disk).

    What a durable SQLite commit waits for at least once (WAL, synchronous=FULL): the 1-in-flight latency
    goal allows for it.
    """
    times: list[float] = []
    path = directory / "fsync-probe"
    with path.open("ab") as handle:
        for _ in range(syncs):
            start = time.perf_counter()
            handle.write(b"\0" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
            times.append((time.perf_counter() - start) * 1000)
    path.unlink()
    times.sort()
    return statistics.median(times), times[int(0.99 * (len(times) - 1))]


def markdown(rows: list[Row]) -> str:
    lines = [
        "| RPC | storage | in flight | echo calls/s | posguard calls/s | ratio | p50 ms echo / posguard "
        "| p99 ms echo / posguard | server CPU ms/call echo / posguard "
        "| context switches/call echo / posguard |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        latency = f"| {r.echo_p50_ms:.2f} / {r.p50_ms:.2f} | {r.echo_p99_ms:.2f} / {r.p99_ms:.2f} "
        if r.inflight == "stream":
            # A stream's client sends as fast as flow control lets it: a reply's wait is mostly queueing.
            latency = "| — | — "
        lines.append(
            f"| {r.rpc} | {r.storage} | {r.inflight} | {r.echo_rate:,.0f} | {r.rate:,.0f} | {r.ratio:.2f} "
            f"{latency}| {r.echo_cpu_ms:.3f} / {r.cpu_ms:.3f} | {r.echo_switches:.1f} / {r.switches:.1f} |"
        )
    return "\n".join(lines)


# -- the run ------------------------------------------------------------------------------------------


async def measure(args: argparse.Namespace) -> tuple[list[Row], tuple[float, float]]:
    requests = Requests()
    rows: list[Row] = []
    need = 4000 * int(args.seconds + 1)  # requests a window may use at most, with room to spare

    async def unary(
        rpc: str,
        storage: str,
        method: str,
        server: Process,
        baseline: Process,
        token: str,
        make: MakeRequests,
        answered: grpc.StatusCode = grpc.StatusCode.OK,
    ) -> None:
        for inflight in args.inflight:
            base, ours = [], []
            for _ in range(args.repeats):
                batch = make(need)
                base.append(await unary_window(baseline, ECHO, token, batch, inflight, args.seconds))
                ours.append(
                    await unary_window(
                        server, method, token, batch, inflight, args.seconds, answered=answered
                    )
                )
            rows.append(row(rpc, storage, str(inflight), base, ours))
            _progress(rows[-1])

    with tempfile.TemporaryDirectory(prefix="posguard-bench-") as tmp:
        fsync = fsync_ms(Path(tmp))
        sqlite_profile = args.py_spy / "sqlite.txt" if args.py_spy else None
        # Misses: a limit no window reaches, so that the key's misses are counted and never refused.
        flags = ["--failure-limit", "1000000000"] if "miss" in args.only else []
        with posguard(Path(tmp) / "sqlite", None, *flags, profile=sqlite_profile) as (server, token):
            requests.numbers = await fetch_numbers(server.port, token, requests.refs)
            with echo(await _reply_size(server, token, requests)) as baseline:
                if "score" in args.only:
                    await unary("ScoreTransaction", "SQLite", SCORE, server, baseline, token, requests.scores)
                if args.rules:
                    await with_rules(args, rows, server, baseline, token, requests, need)
                if "stream" in args.only:
                    base, ours = [], []
                    for _ in range(args.repeats):
                        batch = requests.stream_items(need * 4)
                        base.append(await stream_window(baseline, ECHO_STREAM, token, batch, args.seconds))
                        ours.append(await stream_window(server, SCORE_STREAM, token, batch, args.seconds))
                    rows.append(row("ScoreTransactions (stream)", "SQLite", "stream", base, ours))
                    _progress(rows[-1])
                if "verify" in args.only:
                    await unary(
                        "VerifyCustomerId", "SQLite", VERIFY, server, baseline, token, requests.verifies
                    )
                if "redeem" in args.only or "code" in args.only:
                    requests.secrets = await enroll(server.port, token, requests.numbers)
                if "redeem" in args.only:
                    await unary(
                        "RedeemDynamicCode", "SQLite", REDEEM, server, baseline, token, requests.redemptions
                    )
                if "code" in args.only:
                    await unary(
                        "IssueDynamicCode",
                        "SQLite",
                        ISSUE_CODE,
                        server,
                        baseline,
                        token,
                        requests.code_issues,
                    )
                if "issue" in args.only:
                    await unary("IssueCustomerId", "SQLite", ISSUE, server, baseline, token, requests.issues)
                if "resolve" in args.only:
                    await unary(
                        "ResolveExternalId", "SQLite", RESOLVE, server, baseline, token, requests.resolves
                    )
                if "miss" in args.only:
                    await unary(
                        "ResolveExternalId (misses)",
                        "SQLite",
                        RESOLVE,
                        server,
                        baseline,
                        token,
                        requests.misses,
                        answered=grpc.StatusCode.NOT_FOUND,
                    )
        if args.postgres:
            pg_profile = args.py_spy / "postgresql.txt" if args.py_spy else None
            with (
                scratch_postgres_database(args.postgres, "posguard_bench") as url,
                posguard(Path(tmp) / "pg", url, profile=pg_profile) as (server, token),
                echo(await _reply_size(server, token, requests)) as baseline,
            ):
                await unary("ScoreTransaction", "PostgreSQL", SCORE, server, baseline, token, requests.scores)
    return rows, fsync


async def with_rules(
    args: argparse.Namespace,
    rows: list[Row],
    server: Process,
    baseline: Process,
    token: str,
    requests: Requests,
    need: int,
) -> None:
    """ScoreTransaction without rules and with ``args.rules`` active, window after window, same server."""
    rules = bench_rules(args.rules, args.rules_firing)
    current: bool | None = None
    for inflight in args.inflight:
        base: dict[bool, list[Window]] = {False: [], True: []}
        ours: dict[bool, list[Window]] = {False: [], True: []}
        replies: list[bytes] = []  # a sample of the answers given with the rules active
        for repeat in range(args.repeats):
            # ABBA order: a drift during the run (the stored history grows) falls on both sides alike.
            for active in (False, True) if repeat % 2 == 0 else (True, False):
                if active != current:
                    await asyncio.to_thread(set_rules, server.port, rules, active)
                    current = active
                batch = requests.scores(need)
                base[active].append(await unary_window(baseline, ECHO, token, batch, inflight, args.seconds))
                ours[active].append(
                    await unary_window(
                        server, SCORE, token, batch, inflight, args.seconds, replies if active else None
                    )
                )
        for active in (False, True):
            name = f"ScoreTransaction, {len(rules) if active else 0} rules"
            rows.append(row(name, "SQLite", str(inflight), base[active], ours[active]))
            _progress(rows[-1])
        fired = rule_share(replies)
        without, with_ = (_median(ours[a], lambda w: w.cpu_ms_per_call) for a in (False, True))
        # Each pair of neighbouring windows shares the machine's state of the moment: the median of their
        # ratios is steadier than the ratio of the two medians when other work comes and goes.
        pairs = sorted(
            w.cpu_ms_per_call / o.cpu_ms_per_call for w, o in zip(ours[True], ours[False], strict=True)
        )
        quartiles = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else [pairs[0]] * 3
        print(
            f"rules: server CPU per call {without:.3f} ms without, {with_:.3f} ms with {len(rules)} "
            f"(x{with_ / without:.3f}); paired windows: median x{statistics.median(pairs):.3f}, "
            f"quartiles x{quartiles[0]:.3f} to x{quartiles[2]:.3f} over {len(pairs)} pairs; "
            f"{inflight} in flight; a rule fired on {fired:.1%} of the answers (every 20th, with rules)",
            file=sys.stderr,
        )
    await asyncio.to_thread(set_rules, server.port, rules, False)


def rule_share(replies: list[bytes]) -> float:
    """The share of ScoreTransaction answers that name a benchmark rule among their reasons."""
    answers = [risk_pb2.ScoreTransactionResponse.FromString(reply) for reply in replies]
    fired = sum(any(reason.code.startswith("BENCH_") for reason in a.reasons) for a in answers)
    return fired / max(len(answers), 1)


async def _reply_size(server: Process, token: str, requests: Requests) -> int:
    """The size of a real ScoreTransaction answer, for the echo server's replies."""
    metadata = (("authorization", f"Bearer {token}"),)
    async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.unary_unary(SCORE, request_serializer=_raw, response_deserializer=_raw)
        reply: bytes = await call(requests.scores(1)[0], metadata=metadata, timeout=30)
    return len(reply)


def _progress(r: Row) -> None:
    print(
        f"{r.rpc} {r.storage} {r.inflight}: {r.rate:,.0f}/s vs echo {r.echo_rate:,.0f}/s ({r.ratio:.2f})",
        file=sys.stderr,
    )


def add_window_arguments(
    parser: argparse.ArgumentParser, *, seconds: float = 5.0, repeats: int = 3, inflight: list[int]
) -> None:
    """``--seconds``, ``--repeats`` and ``--inflight``: the windows, alike in every benchmark here."""
    parser.add_argument("--seconds", type=float, default=seconds, help="length of one measured window")
    parser.add_argument(
        "--repeats", type=int, default=repeats, help="windows per measurement (median reported)"
    )
    parser.add_argument(
        "--inflight",
        type=lambda s: [int(x) for x in s.split(",")],
        default=inflight,
        help="calls in flight, e.g. 1,8,64",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_window_arguments(parser, inflight=[1, 8, 64])
    parser.add_argument("--postgres", default="", help="PostgreSQL server URL; a fresh database is made")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument(
        "--only",
        type=lambda s: set(s.split(",")),
        default={"score", "stream", "verify", "redeem", "code", "issue", "resolve"},
        help="which SQLite measurements: score,stream,verify,redeem,code,issue,resolve,miss (by default all "
        "but miss; --postgres adds its own)",
    )
    parser.add_argument(
        "--rules", type=int, default=0, help="also measure scoring with this many active rules (SQLite)"
    )
    parser.add_argument(
        "--rules-firing",
        type=int,
        default=0,
        help="lower the thresholds of this many velocity and model-score rules (7: earlier releases' set)",
    )
    parser.add_argument(
        "--py-spy", type=Path, help="record each posguard server with py-spy into this folder"
    )
    parser.add_argument(
        "--py-spy-gil",
        action="store_true",
        help="record only the thread holding the interpreter lock (where a GIL-bound server's CPU goes)",
    )
    args = parser.parse_args()
    if args.py_spy_gil:
        PY_SPY_FLAGS.append("--gil")
    rows, (fsync_p50, fsync_p99) = asyncio.run(measure(args))
    print(markdown(rows))
    print(f"\ndisk: append 4 KiB + fsync p50 {fsync_p50:.2f} ms, p99 {fsync_p99:.2f} ms (200 syncs)")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
