"""Load shedding: ScoreTransaction offered 4x the rate a server sustains, open loop, per concurrency limit.

    .venv/bin/python bench/overload_bench.py [--limits 2,4,16,1000] [--seconds 3] [--repeats 3]

For each ``max_concurrent_rpcs`` limit a trained server is started (as ``bench/rpc_bench.py`` does; SQLite),
its sustainable rate is measured with min(limit, 8) calls in flight, then it is offered four times that rate
open loop (a call every 1/rate seconds whatever the answers, as independent gateways send) and then half of
it. Reports, per limit, the median over ``--repeats`` rounds of: the sustainable rate, what was accepted and
refused at 4x, the accepted calls' p50/p99 latency and the refused calls' p99, and the p99 at 0.5x. A limit
of 1000 is the server without effective shedding: every call is admitted and queues.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc import aio
from rpc_bench import SCORE, Requests, _raw, fetch_numbers, posguard


@dataclass
class Offered:
    """What one open-loop window saw: latencies by status code."""

    seconds: float
    latencies: dict[str, list[float]] = field(default_factory=dict)

    def rate(self, code: str) -> float:
        return len(self.latencies.get(code, [])) / self.seconds

    def p(self, code: str, q: float) -> float:
        values = sorted(self.latencies.get(code, []))
        return 1000 * values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


# More scores per second than a closed loop of at most 8 calls gets from one server process.
_CLOSED_MAX_PER_S = 10_000


async def open_loop(port: int, token: str, requests: list[bytes], rate: float, seconds: float) -> Offered:
    metadata = (("authorization", f"Bearer {token}"),)
    offered = Offered(seconds)
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(SCORE, request_serializer=_raw, response_deserializer=_raw)
        feed = iter(requests)

        async def one() -> None:
            began = time.perf_counter()
            code = "OK"
            try:
                await call(next(feed), metadata=metadata, timeout=30)
            except grpc.RpcError as error:
                code = error.code().name
            offered.latencies.setdefault(code, []).append(time.perf_counter() - began)

        tasks: list[asyncio.Task[None]] = []
        began = time.perf_counter()
        while (now := time.perf_counter()) < began + seconds:
            while len(tasks) < int((now - began) * rate) + 1:
                tasks.append(asyncio.create_task(one()))
            await asyncio.sleep(0.5 / rate)
        await asyncio.gather(*tasks)
    return offered


async def closed_rate(port: int, token: str, requests: list[bytes], inflight: int, seconds: float) -> float:
    """Answered calls per second with ``inflight`` calls always in flight (a refusal is not throughput)."""
    metadata = (("authorization", f"Bearer {token}"),)
    answered = 0
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(SCORE, request_serializer=_raw, response_deserializer=_raw)
        feed = iter(requests)
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal answered
            while time.perf_counter() < stop:
                try:
                    await call(next(feed), metadata=metadata, timeout=30)
                    answered += 1
                except grpc.RpcError:
                    await asyncio.sleep(0.001)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        return answered / (time.perf_counter() - began)


@dataclass
class Round:
    sustainable: float
    overloaded: Offered
    recovered: Offered

    def figures(self) -> dict[str, float]:
        over, calm = self.overloaded, self.recovered
        return {
            "sustained": self.sustainable,
            "accepted": over.rate("OK"),
            "refused": over.rate("RESOURCE_EXHAUSTED"),
            "accepted_p50": over.p("OK", 0.5),
            "accepted_p99": over.p("OK", 0.99),
            "refused_p99": over.p("RESOURCE_EXHAUSTED", 0.99),
            "calm_refused": calm.rate("RESOURCE_EXHAUSTED"),
            "calm_p99": calm.p("OK", 0.99),
        }


async def rounds(limit: int, args: argparse.Namespace, tmp: Path) -> list[Round]:
    requests = Requests()
    done: list[Round] = []
    inflight = min(limit, 8)  # a high limit is measured as the limit-8 one would be
    with posguard(tmp / f"limit-{limit}", None, "--max-concurrent-rpcs", str(limit)) as (server, token):
        requests.numbers = await fetch_numbers(server.port, token, requests.refs)
        for _ in range(args.repeats):
            # Enough requests for what a window can send (a faster server must not run the feed dry).
            closed_feed = requests.scores(int(_CLOSED_MAX_PER_S * args.seconds))
            rate = await closed_rate(server.port, token, closed_feed, inflight, args.seconds)
            over_feed = requests.scores(math.ceil(4 * rate * args.seconds) + 100)
            over = await open_loop(server.port, token, over_feed, 4 * rate, args.seconds)
            await asyncio.sleep(0.5)  # the backlog drains
            calm_feed = requests.scores(math.ceil(rate / 2 * args.seconds) + 100)
            calm = await open_loop(server.port, token, calm_feed, rate / 2, args.seconds)
            done.append(Round(rate, over, calm))
            print(
                f"limit {limit}: {rate:.0f}/s sustained; at 4x accepted {over.rate('OK'):.0f}/s "
                f"p99 {over.p('OK', 0.99):.1f} ms, refused {over.rate('RESOURCE_EXHAUSTED'):.0f}/s; "
                f"at 0.5x refused {calm.rate('RESOURCE_EXHAUSTED'):.0f}/s",
                file=sys.stderr,
            )
    return done


def _ms(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.1f}"  # nothing was refused


def markdown(results: dict[int, list[Round]]) -> str:
    lines = [
        "| limit | sustained calls/s | at 4x: accepted calls/s | refused calls/s "
        "| accepted p50 / p99 ms | refused p99 ms | at 0.5x: refused calls/s | p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for limit, done in results.items():
        figures = [r.figures() for r in done]
        m = {key: statistics.median(f[key] for f in figures) for key in figures[0]}
        lines.append(
            f"| {limit} | {m['sustained']:.0f} | {m['accepted']:.0f} "
            f"| {m['refused']:.0f} "
            f"| {m['accepted_p50']:.1f} / {m['accepted_p99']:.1f} | {_ms(m['refused_p99'])} "
            f"| {m['calm_refused']:.0f} | {m['calm_p99']:.1f} |"
        )
    return "\n".join(lines)


async def measure(args: argparse.Namespace) -> dict[int, list[Round]]:
    with tempfile.TemporaryDirectory(prefix="posguard-overload-") as tmp:
        return {limit: await rounds(limit, args, Path(tmp)) for limit in args.limits}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--limits",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[2, 4, 16, 1000],
        help="e.g. 2,4,16",
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each window")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per limit (median reported)")
    print(markdown(asyncio.run(measure(parser.parse_args()))))


if __name__ == "__main__":
    main()
