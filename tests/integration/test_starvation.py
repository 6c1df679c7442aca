"""Starvation: idle streams, callers without a valid key and heavy listings cannot lock the gateways out.

Each test runs a real server on loopback (SQLite and PostgreSQL) and real concurrent clients on connections
of their own, and proves its point by counting answers, not by timing them: with the pressure on, every
gateway call made is answered, none refused with RESOURCE_EXHAUSTED. Without admission by class, work-based
stream admission and authentication before admission, each of these scenarios refuses gateway calls (16
idle streams took every slot; made-up key ids and listings took a share of them).

The reaping tests use short configured times and wait for the server to act, within a bound far above them:
they assert what ended the stream or connection, not how fast.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc import aio

from posguard.errors import from_rpc_error
from posguard.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    customer_ids_pb2,
    customer_ids_pb2_grpc,
    risk_pb2,
    risk_pb2_grpc,
)
from posguard_server.api.pipeline import GATEWAY_CALLS as GATEWAY
from posguard_server.store.audit import NewEvent, append_events
from posguard_server.store.migrate import upgrade

if TYPE_CHECKING:
    from .conftest import RunningServer

IDLE_STREAMS = 24  # more than the default max_concurrent_rpcs (16)
GATEWAY_WORKERS = 8  # gateway calls in flight at once: below the limit, so none may be refused
CALLS_PER_WORKER = 25
HOSTILE_WORKERS = 32
AUDIT_EVENTS = 1_000
PAGE = 1_000
TIMEOUT = 30.0  # every client call's deadline: far above anything expected, so a refusal is never a timeout
# The trailer a rich status (google.rpc.Status) travels in: posguard sends one with every error.
STATUS_DETAILS = "grpc-status-details-bin"


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _transaction(number: str) -> risk_pb2.Transaction:
    transaction = risk_pb2.Transaction(
        transaction_id=f"tx-{uuid.uuid4().hex}",
        customer_number=number,
        amount=common_pb2.Money(amount_minor=1_250, currency="CNY"),
        merchant_id="m-1",
        terminal_id="t-1",
        mcc="5411",
        channel=common_pb2.CHANNEL_POS,
    )
    transaction.event_time.GetCurrentTime()
    return transaction


async def _code(call: Awaitable[Any]) -> str:
    try:
        await call
    except aio.AioRpcError as error:
        return error.code().name
    return "OK"


@pytest.fixture
def running(server_factory: Callable[..., RunningServer], database_url: str) -> Callable[..., RunningServer]:
    """Start a server on each backend with setting overrides (the database migrated first)."""
    upgrade(database_url)

    def start(**overrides: Any) -> RunningServer:
        return server_factory(database_url=database_url, **overrides)

    return start


async def _issue(channel: aio.Channel, token: str, count: int) -> list[tuple[str, str]]:
    """``count`` new customers: (number, customer id)."""
    ids = customer_ids_pb2_grpc.CustomerIdsStub(channel)
    issued = []
    for _ in range(count):
        reply = await ids.IssueCustomerId(
            customer_ids_pb2.IssueCustomerIdRequest(request_id=f"rq-{uuid.uuid4().hex}"),
            metadata=_bearer(token),
            timeout=TIMEOUT,
        )
        issued.append((reply.customer.primary.number, reply.customer.customer_id))
    return issued


async def _gateway_load(target: str, token: str, customers: list[tuple[str, str]]) -> Counter[str]:
    """``GATEWAY_WORKERS`` clients, each on a connection of its own, each making ``CALLS_PER_WORKER`` calls
    (verifications, scores and look-ups in turn) one after another; the (method, code) of every answer."""
    outcomes: Counter[str] = Counter()

    async def worker(n: int) -> None:
        async with aio.insecure_channel(target) as channel:
            ids = customer_ids_pb2_grpc.CustomerIdsStub(channel)
            risk = risk_pb2_grpc.RiskStub(channel)
            for i in range(CALLS_PER_WORKER):
                number, customer_id = customers[(n + i) % len(customers)]
                kind = i % 3
                if kind == 0:
                    call: Awaitable[Any] = ids.VerifyCustomerId(
                        customer_ids_pb2.VerifyCustomerIdRequest(number=number),
                        metadata=_bearer(token),
                        timeout=TIMEOUT,
                    )
                elif kind == 1:
                    call = risk.ScoreTransaction(
                        risk_pb2.ScoreTransactionRequest(transaction=_transaction(number)),
                        metadata=_bearer(token),
                        timeout=TIMEOUT,
                    )
                else:
                    selector = common_pb2.CustomerSelector(customer_id=customer_id)
                    call = ids.GetCustomer(
                        customer_ids_pb2.GetCustomerRequest(customer=selector),
                        metadata=_bearer(token),
                        timeout=TIMEOUT,
                    )
                outcomes[f"{('verify', 'score', 'get')[kind]} {await _code(call)}"] += 1

    await asyncio.gather(*(worker(n) for n in range(GATEWAY_WORKERS)))
    return outcomes


async def _verifications(target: str, token: str, numbers: list[str]) -> tuple[Counter[str], list[float]]:
    """``GATEWAY_WORKERS`` clients verifying numbers, ``CALLS_PER_WORKER`` each: codes and latencies."""
    codes: Counter[str] = Counter()
    latencies: list[float] = []

    async def worker(n: int) -> None:
        async with aio.insecure_channel(target) as channel:
            ids = customer_ids_pb2_grpc.CustomerIdsStub(channel)
            for i in range(CALLS_PER_WORKER):
                request = customer_ids_pb2.VerifyCustomerIdRequest(number=numbers[(n + i) % len(numbers)])
                started = time.perf_counter()
                codes[
                    await _code(ids.VerifyCustomerId(request, metadata=_bearer(token), timeout=TIMEOUT))
                ] += 1
                latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker(n) for n in range(GATEWAY_WORKERS)))
    return codes, latencies


class Pressure:
    """``HOSTILE_WORKERS`` clients on a few connections making ``call`` over and over until stopped."""

    def __init__(self, target: str, call: Callable[[aio.Channel], Awaitable[Any]], *, backoff: float) -> None:
        self._target = target
        self._call = call
        self._backoff = backoff  # after a RESOURCE_EXHAUSTED, as the clients' retry policy would
        self._stop = asyncio.Event()
        self.codes: Counter[str] = Counter()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Pressure:
        channels = [aio.insecure_channel(self._target) for _ in range(4)]
        self._channels = channels
        self._tasks = [
            asyncio.create_task(self._worker(channels[n % len(channels)])) for n in range(HOSTILE_WORKERS)
        ]
        # The pressure is on before the gateways start: every worker has had answers.
        while self.codes.total() < 2 * HOSTILE_WORKERS:
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        for channel in self._channels:
            await channel.close()

    async def _worker(self, channel: aio.Channel) -> None:
        while not self._stop.is_set():
            code = await _code(self._call(channel))
            self.codes[code] += 1
            if code == "RESOURCE_EXHAUSTED":
                await asyncio.sleep(self._backoff)


# -- (a) idle streams -------------------------------------------------------------------------------------


async def _open_stream(risk: risk_pb2_grpc.RiskStub, token: str, number: str) -> Any:
    """A ScoreTransactions stream that has sent one transaction and had it answered."""
    stream = risk.ScoreTransactions(metadata=_bearer(token), timeout=TIMEOUT * 4)
    await stream.write(risk_pb2.ScoreTransactionsRequest(transaction=_transaction(number)))
    reply = await stream.read()
    assert reply.WhichOneof("outcome") == "result", reply
    return stream


def test_idle_streams_hold_no_slot_other_calls_are_all_answered(
    running: Callable[..., RunningServer],
) -> None:
    server = running(stream_idle_seconds=0)  # never reaped here: the streams stay open throughout
    token = server.key("gateway")

    async def scenario() -> tuple[Counter[str], int]:
        async with aio.insecure_channel(server.target) as channel:
            customers = await _issue(channel, token, 10)
            risk = risk_pb2_grpc.RiskStub(channel)
            streams = [
                await _open_stream(risk, token, customers[i % len(customers)][0]) for i in range(IDLE_STREAMS)
            ]
            outcomes = await _gateway_load(server.target, token, customers)
            # The idle streams are still open and still score: each sends one more transaction.
            answered = 0
            for i, stream in enumerate(streams):
                number = customers[i % len(customers)][0]
                await stream.write(risk_pb2.ScoreTransactionsRequest(transaction=_transaction(number)))
                reply = await stream.read()
                answered += reply.WhichOneof("outcome") == "result"
                await stream.done_writing()
                assert await stream.read() == aio.EOF
                assert await stream.code() == grpc.StatusCode.OK
            return outcomes, answered

    outcomes, answered = asyncio.run(scenario())
    calls = GATEWAY_WORKERS * CALLS_PER_WORKER
    assert {key.split()[1] for key in outcomes} == {"OK"}, outcomes
    assert outcomes.total() == calls
    assert answered == IDLE_STREAMS


def test_an_idle_stream_is_ended_after_the_idle_time_and_a_busy_one_is_not(
    running: Callable[..., RunningServer],
) -> None:
    idle = 1.0
    server = running(stream_idle_seconds=idle)
    token = server.key("gateway")

    async def scenario() -> tuple[int, aio.AioRpcError]:
        async with aio.insecure_channel(server.target) as channel:
            ((number, _),) = await _issue(channel, token, 1)
            risk = risk_pb2_grpc.RiskStub(channel)
            # Busy: a transaction every tenth of the idle time, for longer than the idle time in all.
            busy = risk.ScoreTransactions(metadata=_bearer(token), timeout=TIMEOUT)
            answered = 0
            for _ in range(15):
                await busy.write(risk_pb2.ScoreTransactionsRequest(transaction=_transaction(number)))
                answered += (await busy.read()).WhichOneof("outcome") == "result"
                await asyncio.sleep(idle / 10)
            await busy.done_writing()
            assert await busy.read() == aio.EOF
            assert await busy.code() == grpc.StatusCode.OK
            # Idle after one transaction: the server ends it (well before the client's own deadline).
            stream = await _open_stream(risk, token, number)
            with pytest.raises(aio.AioRpcError) as ended:
                await stream.read()
            return answered, ended.value

    answered, error = asyncio.run(scenario())
    assert answered == 15
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert from_rpc_error(error).reason == "STREAM_IDLE"  # the server's status, not the client's deadline
    assert "no request on this stream for 1 s" in (error.details() or "")


def test_a_stream_waiting_for_its_transactions_to_be_scored_is_not_idle(
    server_factory: Callable[..., RunningServer],
) -> None:
    """The idle clock stops while a batch of the stream is being scored: here the batch waits for SQLite's
    write lock, held by the test for longer than the idle time, and the stream still ends normally."""
    idle = 1.0
    server = server_factory(stream_idle_seconds=idle)  # SQLite: its write lock can be held from outside
    token = server.key("gateway")

    async def scenario() -> tuple[str | None, grpc.StatusCode]:
        async with aio.insecure_channel(server.target) as channel:
            ((number, _),) = await _issue(channel, token, 1)
            stream = risk_pb2_grpc.RiskStub(channel).ScoreTransactions(
                metadata=_bearer(token), timeout=TIMEOUT
            )
            lock = sqlite3.connect(server.settings.data_dir / "posguard.db", isolation_level=None)
            try:
                lock.execute("BEGIN IMMEDIATE")
                await stream.write(risk_pb2.ScoreTransactionsRequest(transaction=_transaction(number)))
                await asyncio.sleep(2.5 * idle)  # the batch waits for the lock, the stream sends nothing
            finally:
                lock.execute("ROLLBACK")
                lock.close()
            outcome = (await stream.read()).WhichOneof("outcome")
            await stream.done_writing()
            assert await stream.read() == aio.EOF
            return outcome, await stream.code()

    outcome, code = asyncio.run(scenario())
    assert outcome == "result"
    assert code == grpc.StatusCode.OK


def _in_progress(server: RunningServer, admission: str) -> float:
    value = server.server.metrics.registry.get_sample_value(
        "posguard_rpc_in_progress", {"admission": admission}
    )
    return value or 0.0


def test_a_stream_whose_transactions_arrive_at_capacity_is_ended_and_keeps_what_it_was_answered(
    server_factory: Callable[..., RunningServer],
) -> None:
    """The one gateway slot is held by a call waiting for SQLite's write lock (held by the test): the stream,
    open and answered before, is ended RESOURCE_EXHAUSTED when its next transaction needs the slot."""
    server = server_factory(max_concurrent_rpcs=1, stream_idle_seconds=0)
    token = server.key("gateway")

    async def scenario() -> tuple[str, str, str]:
        async with aio.insecure_channel(server.target) as channel:
            ((number, _),) = await _issue(channel, token, 1)
            risk = risk_pb2_grpc.RiskStub(channel)
            stream = await _open_stream(risk, token, number)  # answered (asserted) while the slot was free
            assert _in_progress(server, GATEWAY) == 0  # open and idle, it holds nothing
            lock = sqlite3.connect(server.settings.data_dir / "posguard.db", isolation_level=None)
            try:
                lock.execute("BEGIN IMMEDIATE")
                request = risk_pb2.ScoreTransactionRequest(transaction=_transaction(number))
                waiting = asyncio.ensure_future(
                    _code(risk.ScoreTransaction(request, metadata=_bearer(token), timeout=TIMEOUT))
                )
                while _in_progress(server, GATEWAY) < 1:
                    await asyncio.sleep(0.01)
                await stream.write(risk_pb2.ScoreTransactionsRequest(transaction=_transaction(number)))
                with pytest.raises(aio.AioRpcError) as ended:
                    await stream.read()
            finally:
                lock.execute("ROLLBACK")
                lock.close()
            return ended.value.code().name, from_rpc_error(ended.value).reason, await waiting

    code, reason, waited = asyncio.run(scenario())
    assert (code, reason) == ("RESOURCE_EXHAUSTED", "OVERLOADED")
    assert waited == "OK"  # the call that held the slot was answered


def test_idle_and_old_connections_are_closed_by_the_server(running: Callable[..., RunningServer]) -> None:
    server = running(
        max_connection_idle_seconds=0.5, max_connection_age_seconds=1.0, max_connection_age_grace_seconds=0.5
    )
    token = server.key("gateway")

    async def scenario() -> tuple[bool, str, str]:
        async with aio.insecure_channel(server.target) as channel:
            ((number, _),) = await _issue(channel, token, 1)
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            # No call in progress: the server sends GOAWAY and the client's channel goes idle.
            went_idle = False
            bound = time.monotonic() + TIMEOUT
            while not went_idle and time.monotonic() < bound:
                try:
                    await asyncio.wait_for(channel.wait_for_state_change(grpc.ChannelConnectivity.READY), 1)
                except TimeoutError:
                    continue
                went_idle = channel.get_state() != grpc.ChannelConnectivity.READY
        async with aio.insecure_channel(server.target) as channel:
            # Never idle, but old: past its age and grace the connection is closed under the stream.
            risk = risk_pb2_grpc.RiskStub(channel)
            code = details = ""
            bound = time.monotonic() + TIMEOUT
            while code == "" and time.monotonic() < bound:
                stream = risk.ScoreTransactions(metadata=_bearer(token), timeout=TIMEOUT)
                code = "OK"
                while code == "OK" and time.monotonic() < bound:
                    try:
                        item = risk_pb2.ScoreTransactionsRequest(transaction=_transaction(number))
                        await stream.write(item)
                        await stream.read()
                    except (aio.AioRpcError, asyncio.InvalidStateError):
                        # The call's own status, as the server ended it: a write that loses the race with
                        # that status fails on the client's side instead (InvalidStateError).
                        code, details = (await stream.code()).name, await stream.details() or ""
                        trailers = await stream.trailing_metadata() or ()
                        if code == "INTERNAL" and not any(key == STATUS_DETAILS for key, _ in trailers):
                            # Or the lost write becomes the call's status itself: gRPC core's own INTERNAL
                            # ("Failed execute_batch" and others, seen in CI), without the status details
                            # every status posguard sends carries. Nothing about the server: a new stream,
                            # on a new connection that ages out in turn. (A server that only ever answered
                            # a bare INTERNAL would leave the code empty at the bound, and fail.)
                            code = ""
                    await asyncio.sleep(0.05)
            return went_idle, code, details

    went_idle, code, details = asyncio.run(scenario())
    assert went_idle
    assert code == "UNAVAILABLE", details


# -- (b) callers without a valid key ----------------------------------------------------------------------


def test_calls_with_made_up_key_ids_do_not_shed_gateway_calls(running: Callable[..., RunningServer]) -> None:
    server = running()
    token = server.key("gateway")

    def made_up(channel: aio.Channel) -> Awaitable[Any]:
        # A well-formed key with a new id every time: the cache cannot answer it, only the database can.
        key = f"pgk_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"
        ids = customer_ids_pb2_grpc.CustomerIdsStub(channel)
        request = customer_ids_pb2.VerifyCustomerIdRequest(number="1564 2011 0212 3456 7890")
        return ids.VerifyCustomerId(request, metadata=_bearer(key), timeout=TIMEOUT)

    async def scenario() -> tuple[Counter[str], Counter[str]]:
        async with aio.insecure_channel(server.target) as channel:
            customers = await _issue(channel, token, 10)
        async with Pressure(server.target, made_up, backoff=0) as pressure:
            outcomes = await _gateway_load(server.target, token, customers)
        return outcomes, pressure.codes

    outcomes, hostile = asyncio.run(scenario())
    print(f"gateway: {dict(outcomes)}; made-up keys: {dict(hostile)}")
    assert {key.split()[1] for key in outcomes} == {"OK"}, (outcomes, hostile)
    assert outcomes.total() == GATEWAY_WORKERS * CALLS_PER_WORKER
    # Every made-up key was refused, as not valid or, beyond the key-lookup limit, at once.
    assert hostile["UNAUTHENTICATED"] > 0
    assert set(hostile) <= {"UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}, hostile


# -- (c) heavy administrative calls -----------------------------------------------------------------------


def test_audit_listings_of_a_thousand_rows_do_not_starve_verifications(
    running: Callable[..., RunningServer],
) -> None:
    server = running()
    token, auditor = server.key("gateway"), server.key("auditor")
    events = [NewEvent("test", "test.filled", f"s-{n}", {"n": str(n)}) for n in range(AUDIT_EVENTS)]
    with server.server.database.session() as session:
        append_events(session, events, datetime.now(UTC))

    def listing(channel: aio.Channel) -> Awaitable[Any]:
        admin = admin_pb2_grpc.AdminStub(channel)
        request = admin_pb2.ListAuditEventsRequest(page_size=PAGE)
        return admin.ListAuditEvents(request, metadata=_bearer(auditor), timeout=TIMEOUT)

    async def scenario() -> tuple[Counter[str], list[float], Counter[str]]:
        async with aio.insecure_channel(server.target) as channel:
            numbers = [number for number, _ in await _issue(channel, token, 10)]
            page = await listing(channel)
            assert len(page.events) == PAGE  # each listing is a full page of a thousand rows
        async with Pressure(server.target, listing, backoff=0.01) as pressure:
            codes, latencies = await _verifications(server.target, token, numbers)
        return codes, latencies, pressure.codes

    codes, latencies, listings = asyncio.run(scenario())
    # For the record only (not asserted: timings on a shared machine are noise): the issue saw 0.55 s.
    print(
        f"verifications: {dict(codes)}, median {statistics.median(latencies) * 1e3:.1f} ms; "
        f"listings: {dict(listings)}"
    )
    assert codes == Counter({"OK": GATEWAY_WORKERS * CALLS_PER_WORKER}), (codes, listings)
    # The listings were served, only not beyond their own limit.
    assert listings["OK"] > 0
    assert set(listings) <= {"OK", "RESOURCE_EXHAUSTED"}, listings
