"""The ceiling: the same gRPC stack (grpc.aio, one process) with handlers that do nothing.

``python bench/echo_server.py --reply-bytes N [--event-loop uvloop|asyncio]`` prints ``echo serving on PORT``
and serves until killed: ``/bench.Echo/Unary`` answers every request with N bytes,
``/bench.Echo/Stream`` answers every message of a bidirectional stream with N bytes. Requests are taken as
raw bytes, so the only work is gRPC's own.

It runs on the event loop a posguard server started beside it runs on (``POSGUARD_EVENT_LOOP``, else
posguard's default, uvloop) unless ``--event-loop`` names another: the event loop is part of the stack, and
a ceiling on a slower loop than the server's would flatter every ratio to it.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from posguard_server.app import run_loop
from posguard_server.config import EVENT_LOOPS, Settings


def _identity(data: bytes) -> bytes:
    return data


async def serve(reply_bytes: int) -> None:
    reply = b"\x01" * reply_bytes

    async def unary(request: bytes, context: Any) -> bytes:
        return reply

    async def stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield reply

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=_identity, response_serializer=_identity
        ),
        "Stream": grpc.stream_stream_rpc_method_handler(
            stream, request_deserializer=_identity, response_serializer=_identity
        ),
    }
    # Set up as posguard's server is, so the two stacks differ only in the handler: no concurrency limit of
    # gRPC's (posguard admits calls in its pipeline), and the methods found in a table asked as a generic
    # handler, not in gRPC's table of registered methods (see ``PipelinedServer``).
    server = aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"echo serving on {port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reply-bytes", type=int, default=256)
    parser.add_argument(
        "--event-loop", choices=EVENT_LOOPS, help="default: the one a posguard server here would run on"
    )
    args = parser.parse_args()
    settings = Settings() if args.event_loop is None else Settings(event_loop=args.event_loop)
    run_loop(settings, serve(args.reply_bytes))


if __name__ == "__main__":
    main()
