"""The request pipeline alone: a handler that does nothing, behind posguard's pipeline, against the echo.

    .venv/bin/python bench/pipeline_bench.py [--seconds 5] [--repeats 3] [--inflight 1,64] [--reply-bytes 256]
        [--handoff]

Every posguard call passes admission, the deadline, authentication and the role check, error mapping, metrics
and the access log before its servicer runs. This measures that cost alone: a server process built the way
``posguard_server.app`` builds its pipeline (a real API key store on a temporary SQLite database, a real
gateway key, JSON access log at INFO, written to a pipe) serves ``VerifyCustomerId`` with a handler that
answers ``--reply-bytes`` bytes at once; the echo server (``bench/echo_server.py``, on the same event loop)
answers the same number of bytes with nothing in front. Both are measured with ``rpc_bench``'s load generator,
back to back, and the medians of ``--repeats`` windows are reported with their ratio.

``--handoff`` adds a third server: the same pipeline, with a handler that hands its request to a writer
thread through :class:`~posguard_server.api.group_commit.GroupCommit` (batches of at most 64, as the gateway
RPCs use it) and answers once the batch, which does nothing, has run. That is the floor of every RPC that
writes: the pipeline, the trip to the database's writer thread and back, and the wait on the event loop,
without any work of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from rpc_bench import (
    ECHO,
    VERIFY,
    Row,
    _progress,
    _start,
    add_window_arguments,
    echo,
    markdown,
    row,
    unary_window,
)

from posguard_server.api.group_commit import GroupCommit
from posguard_server.api.metrics import Metrics
from posguard_server.app import build_authenticator, build_pipeline, run_loop
from posguard_server.config import Settings
from posguard_server.domain.api_keys import Role, create_key
from posguard_server.logs import configure_logging
from posguard_server.store.api_keys import SqlApiKeyStore
from posguard_server.store.migrate import open_database

SERVICE, METHOD = VERIFY.strip("/").split("/")


def _settings(data_dir: Path) -> Settings:
    # Shedding off, as in rpc_bench: this measures what a server serves, not what it refuses.
    return Settings(data_dir=data_dir, max_concurrent_rpcs=100_000, metrics_enabled=False)


def _identity(data: bytes) -> bytes:
    return data


async def serve(data_dir: Path, reply_bytes: int, handoff: bool) -> None:
    """The pipeline server: posguard's request pipeline in front of a handler that does nothing (``handoff``:
    nothing but a trip through a group commit's writer thread)."""
    settings = _settings(data_dir)
    configure_logging(settings.log_level_number, settings.log_format, background=True)
    keys = SqlApiKeyStore(open_database(settings.effective_database_url))
    pipeline = build_pipeline(settings, build_authenticator(settings, keys), Metrics())
    reply = b"\x01" * reply_bytes

    async def empty(request: bytes, context: Any) -> bytes:
        return reply

    writer: GroupCommit[bytes, bytes] = GroupCommit(lambda items: [reply] * len(items), limit=64)

    async def through_writer(request: bytes, context: Any) -> bytes:
        return await writer.submit(request)

    unary = through_writer if handoff else empty
    handlers = {
        METHOD: grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=_identity, response_serializer=_identity
        )
    }
    # The echo server's options, and registered as posguard's services are: the two servers differ only in
    # the pipeline.
    server = pipeline.serve(aio.server(options=[("grpc.so_reuseport", 0)]))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"pipeline serving on {port}", flush=True)
    await server.wait_for_termination()


def _gateway_key(data_dir: Path) -> str:
    database = open_database(_settings(data_dir).effective_database_url)
    try:
        _, token = create_key(SqlApiKeyStore(database), name="bench", role=Role.GATEWAY, created_by="bench")
    finally:
        database.dispose()
    assert token is not None
    return token


async def measure(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    requests = [b"\x02" * 40] * (20_000 * int(args.seconds + 1))  # a VerifyCustomerId request's size
    with tempfile.TemporaryDirectory(prefix="posguard-pipeline-") as tmp:
        data_dir = Path(tmp)
        token = _gateway_key(data_dir)
        command = [sys.executable, str(Path(__file__).resolve()), "--serve", str(data_dir)]
        command += ["--reply-bytes", str(args.reply_bytes)]
        pipeline = _start(command, r"pipeline serving on (\d+)")
        handoff = _start([*command, "--handoff"], r"pipeline serving on (\d+)") if args.handoff else None
        try:
            with echo(args.reply_bytes) as baseline:
                for inflight in args.inflight:
                    base, ours, through = [], [], []
                    for _ in range(args.repeats):
                        base.append(
                            await unary_window(baseline, ECHO, token, requests, inflight, args.seconds)
                        )
                        ours.append(
                            await unary_window(pipeline, VERIFY, token, requests, inflight, args.seconds)
                        )
                        if handoff is not None:
                            through.append(
                                await unary_window(handoff, VERIFY, token, requests, inflight, args.seconds)
                            )
                    rows.append(row("interceptor chain, empty handler", "-", str(inflight), base, ours))
                    _progress(rows[-1])
                    if handoff is not None:
                        rows.append(
                            row("chain + writer thread, empty batch", "-", str(inflight), base, through)
                        )
                        _progress(rows[-1])
        finally:
            pipeline.stop()
            if handoff is not None:
                handoff.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_window_arguments(parser, inflight=[1, 64])
    parser.add_argument("--reply-bytes", type=int, default=256, help="bytes of every answer, both servers")
    parser.add_argument(
        "--handoff", action="store_true", help="also measure the pipeline with a trip through a writer thread"
    )
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the pipeline server's own process
    args = parser.parse_args()
    if args.serve is not None:
        # On the event loop posguard's server runs on (uvloop by default).
        run_loop(_settings(args.serve), serve(args.serve, args.reply_bytes, args.handoff))
        return
    print(markdown(asyncio.run(measure(args))))


if __name__ == "__main__":
    main()
