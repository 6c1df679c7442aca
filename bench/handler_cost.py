"""What VerifyCustomerId costs in process: the pipeline and the servicer called directly, no gRPC transport.

    .venv/bin/python bench/handler_cost.py [--calls 20000] [--inflight 1,64] [--repeats 5]
        [--without-counters]

A server is built as ``posguard-server serve`` builds it (SQLite in a temporary folder, removed afterwards;
access log off as in ``rpc_bench``), 200 customers are issued through the Python client, and then the method's
handler, composed with the request pipeline exactly as the server registers it, is called ``--calls`` times on
the server's own event loop with ``--inflight`` calls at a time, cycling over the customers' numbers.
Reported: the median over ``--repeats`` passes of wall time and process CPU (every thread: the event loop and
the writer that moves the counters) per call. ``--without-counters`` skips posting the counters of each
success, to see what they cost. The gRPC stack's own work is not in these figures; ``rpc_bench`` measures the
whole call.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import uvloop

import posguard
from posguard.v1 import customer_ids_pb2
from posguard_server.api import pipeline
from posguard_server.app import build_server
from posguard_server.config import Settings
from posguard_server.domain.api_keys import Role, create_key
from posguard_server.store.api_keys import SqlApiKeyStore

METHOD = "VerifyCustomerId"
CUSTOMERS = 200


class _Context:
    """The parts of a gRPC servicer context the pipeline and VerifyCustomerId use on a successful call."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def time_remaining(self) -> float:
        return 30.0

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"

    async def abort(self, *status: Any) -> None:
        raise RuntimeError(f"the call was refused: {status}")


def _capture_composed() -> dict[str, tuple[Any, Any]]:
    """By method name, the handlers the server registers from now on: (composed with the pipeline, bare)."""
    composed: dict[str, tuple[Any, Any]] = {}
    register = pipeline.PipelinedServer.add_registered_method_handlers

    def capture(self: pipeline.PipelinedServer, service_name: str, handlers: dict[str, Any]) -> None:
        for name, handler in handlers.items():
            composed[name] = (self._pipeline.compose(f"/{service_name}/{name}", handler), handler)
        register(self, service_name, handlers)

    pipeline.PipelinedServer.add_registered_method_handlers = capture  # type: ignore[method-assign,assignment]
    return composed


async def _pass(
    handler: Any, requests: list[Any], context: _Context, calls: int, inflight: int
) -> tuple[float, float]:
    async def caller(first: int) -> None:
        for n in range(calls // inflight):
            answer = await handler(requests[(first * 7 + n) % len(requests)], context)
            if not answer.valid:
                raise RuntimeError(f"a verification failed: {answer}")

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(caller(k) for k in range(inflight)))
    done = calls // inflight * inflight
    return (time.perf_counter() - started) / done * 1e6, (time.process_time() - cpu) / done * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=20_000, help="calls per pass")
    parser.add_argument("--inflight", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64])
    parser.add_argument("--repeats", type=int, default=5, help="passes per measurement (median reported)")
    parser.add_argument("--without-counters", action="store_true", help="do not post successes' counters")
    args = parser.parse_args()

    composed = _capture_composed()
    # The data folder holds the database and the key ring: removed afterwards, whatever happens.
    with tempfile.TemporaryDirectory(prefix="posguard-handler-cost-") as folder:
        _measure(args, composed, Path(folder))


def _measure(args: argparse.Namespace, composed: dict[str, tuple[Any, Any]], data_dir: Path) -> None:
    settings = Settings(
        listen="127.0.0.1:0",
        data_dir=data_dir,
        metrics_enabled=False,
        console_enabled=False,
        log_level="WARNING",
        max_concurrent_rpcs=100_000,
    )
    loop = uvloop.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def start() -> tuple[Any, int]:
        server, port = build_server(settings)
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
    keys = SqlApiKeyStore(server.database)
    _, admin = create_key(keys, name="bench admin", role=Role.ADMIN, created_by="bench")
    _, gateway = create_key(keys, name="bench gateway", role=Role.GATEWAY, created_by="bench")
    assert admin is not None
    assert gateway is not None
    with posguard.Client(f"127.0.0.1:{port}", api_key=admin) as client:
        numbers = [client.issue_customer_id().customer.primary.number for _ in range(CUSTOMERS)]
    handler = composed[METHOD][0].unary_unary
    if args.without_counters:
        servicer = composed[METHOD][1].unary_unary.__self__  # the bare handler is the servicer's method

        async def nothing(item: object) -> None:
            return None

        servicer._verified.post = nothing  # what posts each success's counters
    requests = [customer_ids_pb2.VerifyCustomerIdRequest(number=n) for n in numbers]
    context = _Context((("authorization", f"Bearer {gateway}"),))
    try:
        for inflight in args.inflight:
            passes = [
                asyncio.run_coroutine_threadsafe(
                    _pass(handler, requests, context, args.calls, inflight), loop
                ).result(600)
                for _ in range(args.repeats)
            ]
            wall = statistics.median(p[0] for p in passes)
            cpu = statistics.median(p[1] for p in passes)
            print(f"{METHOD}, {inflight} in flight: {wall:.1f} µs wall, {cpu:.1f} µs CPU per call")
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0.1), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)


if __name__ == "__main__":
    main()
