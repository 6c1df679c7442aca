"""Load shedding: beyond a bounded number of calls in progress the server refuses at once, and recovers.

A ``posguard-server serve`` process (its own interpreter, as in production) is measured first: the rate it
sustains with ``max_concurrent_rpcs`` calls in flight. It is then offered four times that rate (less on a
slow machine, ``_offered``), open loop (a call every 1/rate seconds, whether or not earlier ones have
answered, as independent gateways would), then half of it. The client runs in a process of its own. The
excess must be refused with RESOURCE_EXHAUSTED (reason OVERLOADED), faster than the accepted calls are
answered; the accepted calls' latency must stay bounded (without shedding it grows to seconds:
``bench/overload_bench.py``, limit 1000); and with the load back down nothing may be refused.

The latency bounds here are loose on purpose: CI machines are noisy. The issue's goal, a p99 within 50 ms
at 4x, is measured on a quiet machine by ``bench/overload_bench.py`` and reported in the README.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc import aio

from posguard.errors import from_rpc_error
from posguard.v1 import common_pb2, customer_ids_pb2, customer_ids_pb2_grpc, risk_pb2

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Cli, ServeProcess

pytestmark = pytest.mark.slow

SCORE = "/posguard.v1.Risk/ScoreTransaction"
LIMIT = 2
# Far above the 50 ms goal (measured by the bench), far below the seconds of an unshed queue.
OVERLOADED_P99_BOUND_S = 0.5
CALM_P99_BOUND_S = 0.25
# 4x the sustainable rate, but no more than this unless that is under 2x: on a 2-core CI machine the client
# process (its own queue then delays refusals and answers alike) and the server (a refusal costs it about
# half a millisecond) both fall behind beyond it. At 2,000/s both processes fell behind, refusals and answers
# waited alike (p50 30-400 ms for both), and which median was the lower was chance; a server sustaining
# 275-300/s was offered 1,100-1,200/s, and in two of four runs refusals and answers again waited alike (p50
# 150-175 ms, answered p99 up to 0.5 s). The bench (bench/overload_bench.py) measures the full 4x.
MAX_OFFERED_PER_S = 800.0
OVERLOAD_S = 3.0


@dataclass
class Outcomes:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    reasons: set[str] = field(default_factory=set)

    def add(self, code: str, seconds: float) -> None:
        self.latencies.setdefault(code, []).append(seconds)

    def count(self, code: str) -> int:
        return len(self.latencies.get(code, []))

    def p50(self, code: str) -> float:
        return statistics.median(self.latencies.get(code, [0.0]))

    def p99(self, code: str) -> float:
        values = sorted(self.latencies.get(code, []))
        return values[min(len(values) - 1, int(len(values) * 0.99))]

    def summary(self) -> str:
        return ", ".join(
            f"{code}: {len(v)} calls, p50 {statistics.median(v) * 1e3:.1f} ms, "
            f"p99 {self.p99(code) * 1e3:.1f} ms"
            for code, v in sorted(self.latencies.items())
        )


class Gateway:
    """Scores transactions for a handful of customers through one channel.

    Requests are serialised in advance and replies left undecoded: the load generator shares the machine
    with the server, and every microsecond it spends per call is one the server does not get.
    """

    def __init__(self, channel: aio.Channel, token: str, numbers: list[str], count: int) -> None:
        self._score = channel.unary_unary(SCORE, request_serializer=None, response_deserializer=None)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._requests = iter([self._request(numbers[i % len(numbers)], i) for i in range(count)])

    @staticmethod
    def _request(number: str, i: int) -> bytes:
        transaction = risk_pb2.Transaction(
            transaction_id=f"tx-{uuid.uuid4().hex}",
            customer_number=number,
            amount=common_pb2.Money(amount_minor=1_000 + i % 5_000, currency="CNY"),
            merchant_id="m-1",
            terminal_id="t-1",
            mcc="5411",
            channel=common_pb2.CHANNEL_POS,
        )
        transaction.event_time.GetCurrentTime()
        return risk_pb2.ScoreTransactionRequest(transaction=transaction).SerializeToString()

    async def call(self, outcomes: Outcomes) -> None:
        request = next(self._requests)
        started = time.perf_counter()
        code = "OK"
        try:
            await self._score(request, timeout=10, metadata=self._metadata)
        except grpc.RpcError as error:
            code = error.code().name
            if code == "RESOURCE_EXHAUSTED":
                outcomes.reasons.add(from_rpc_error(error).reason)
        outcomes.add(code, time.perf_counter() - started)


async def _closed_loop_rate(gateway: Gateway, in_flight: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            outcomes = Outcomes()
            await gateway.call(outcomes)
            done += outcomes.count("OK")  # a refusal (a delay spike of the loop) is not throughput

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return done / (time.perf_counter() - started)


async def _open_loop(gateway: Gateway, rate: float, seconds: float) -> Outcomes:
    outcomes = Outcomes()
    calls: list[asyncio.Task[None]] = []
    started = time.perf_counter()
    sent = 0
    while (now := time.perf_counter()) < started + seconds:
        due = int((now - started) * rate) + 1
        while sent < due:
            calls.append(asyncio.create_task(gateway.call(outcomes)))
            sent += 1
        await asyncio.sleep(0.5 / rate)
    await asyncio.gather(*calls)
    return outcomes


def _offered(sustainable: float) -> float:
    """The rate of the overload: 4x the sustainable one, or less (``MAX_OFFERED_PER_S``) but 2x at least."""
    return min(4 * sustainable, max(MAX_OFFERED_PER_S, 2 * sustainable))


async def _scenario(port: int, token: str) -> tuple[float, Outcomes, Outcomes]:
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        ids = customer_ids_pb2_grpc.CustomerIdsStub(channel)
        metadata = (("authorization", f"Bearer {token}"),)
        numbers = [
            (
                await ids.IssueCustomerId(
                    customer_ids_pb2.IssueCustomerIdRequest(request_id=f"rq-{i}"),
                    timeout=10,
                    metadata=metadata,
                )
            ).customer.primary.number
            for i in range(20)
        ]
        gateway = Gateway(channel, token, numbers, count=20_000)
        await _closed_loop_rate(gateway, LIMIT, 1.0)  # warm up: key cache, connection pool, models
        sustainable = await _closed_loop_rate(gateway, LIMIT, 3.0)
        overloaded = await _open_loop(gateway, _offered(sustainable), OVERLOAD_S)
        await asyncio.sleep(0.2)  # the backlog of the overload drains
        recovered = await _open_loop(gateway, sustainable / 2, 2.0)
    return sustainable, overloaded, recovered


def _scenario_elsewhere(port: int, token: str) -> tuple[float, Outcomes, Outcomes]:
    """``_scenario`` run by this file in a process of its own: a client in the test's process, beside
    pytest, could not offer four times what the server sustains (it became the bottleneck itself)."""
    done = subprocess.run(
        [sys.executable, __file__, str(port)],
        input=token,  # on stdin: a token in the arguments would show in the process list
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    found = json.loads(done.stdout)

    def outcomes(part: dict[str, Any]) -> Outcomes:
        return Outcomes(part["latencies"], set(part["reasons"]))

    return found["sustainable"], outcomes(found["overloaded"]), outcomes(found["recovered"])


def test_at_four_times_the_sustainable_rate_the_excess_is_refused_and_the_rest_stays_fast(
    tmp_path: Path, cli: Cli, serve_process: ServeProcess
) -> None:
    created = cli("--data-dir", str(tmp_path), "keys", "create", "--role", "gateway", "--json")
    token = json.loads(created.stdout)["token"]
    process, port = serve_process(tmp_path, "--max-concurrent-rpcs", str(LIMIT))
    # Drain the access log, or the pipe fills and the server blocks writing to it.
    assert process.stderr is not None
    threading.Thread(target=process.stderr.read, daemon=True).start()

    sustainable, overloaded, recovered = _scenario_elsewhere(port, token)
    report = (
        f"sustainable {sustainable:.0f}/s with {LIMIT} in flight; "
        f"overloaded: {overloaded.summary()}; at 0.5x: {recovered.summary()}"
    )
    print(report)  # the measured numbers: shown with -s, and in any failure message

    assert set(overloaded.latencies) == {"OK", "RESOURCE_EXHAUSTED"}, report
    assert overloaded.reasons == {"OVERLOADED"}, report
    # The excess is refused: at least half of what was offered beyond the sustainable rate (under overload
    # the server answers fewer calls than it sustains, as refusing costs it too).
    offered = sum(len(v) for v in overloaded.latencies.values())
    assert overloaded.count("RESOURCE_EXHAUSTED") >= 0.5 * (offered - sustainable * OVERLOAD_S), report
    assert overloaded.p50("RESOURCE_EXHAUSTED") < overloaded.p50("OK"), report  # refused at once, not queued
    assert overloaded.p99("OK") <= OVERLOADED_P99_BOUND_S, report
    # Back at half the rate the server serves again: a stray refusal when a burst of the open loop meets a
    # slow commit is the limit of 2 doing its job (a few in a hundred, with batches committing unevenly), but
    # no more than that.
    calm_total = sum(len(v) for v in recovered.latencies.values())
    assert set(recovered.latencies) <= {"OK", "RESOURCE_EXHAUSTED"}, report
    assert recovered.count("RESOURCE_EXHAUSTED") <= 0.05 * calm_total, report
    assert recovered.p99("OK") <= CALM_P99_BOUND_S, report
    assert process.poll() is None


if __name__ == "__main__":
    # The client side of the test (``_scenario_elsewhere``): the server's port, the token on stdin.
    measured = asyncio.run(_scenario(int(sys.argv[1]), sys.stdin.read().strip()))
    sustainable, overloaded, recovered = measured
    parts = {"overloaded": overloaded, "recovered": recovered}
    print(
        json.dumps(
            {
                "sustainable": sustainable,
                **{k: {"latencies": v.latencies, "reasons": sorted(v.reasons)} for k, v in parts.items()},
            }
        )
    )
