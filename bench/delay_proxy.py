"""A TCP proxy that delays every byte by a fixed time each way: a database on another machine, on loopback.

    .venv/bin/python bench/delay_proxy.py [--listen 127.0.0.1:6432] [--to 127.0.0.1:5432] [--delay-ms 0.5]

Each connection accepted on ``--listen`` is joined to ``--to``; what either side sends reaches the other
``--delay-ms`` later (so a round trip costs twice that more), in order, whatever the load. Point a benchmark's
PostgreSQL URL at the proxy (``rpc_bench.py --postgres postgresql+psycopg://postgres@127.0.0.1:6432/test``) to
see what the round trips of a unit cost when the database is not on the same machine: a writer waits for
each of them.

Threads, not an event loop: asyncio's and uvloop's timers count whole milliseconds, and a sleeping thread
wakes within some tens of microseconds. Runs until interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import threading
import time
from collections import deque


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _pipe(source: socket.socket, target: socket.socket, delay: float) -> None:
    """Copy ``source`` to ``target``, each chunk ``delay`` seconds after it arrived."""
    queue: deque[tuple[float, bytes]] = deque()
    ready = threading.Condition()

    def read() -> None:
        while True:
            try:
                data = source.recv(1 << 16)
            except OSError:
                data = b""
            with ready:
                queue.append((time.monotonic() + delay, data))
                ready.notify()
            if not data:
                return

    def write() -> None:
        while True:
            with ready:
                while not queue:
                    ready.wait()
                due, data = queue.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                if not data:
                    target.shutdown(socket.SHUT_WR)
                    return
                target.sendall(data)
            except OSError:
                return

    threading.Thread(target=read, daemon=True).start()
    threading.Thread(target=write, daemon=True).start()


def serve(listen: tuple[str, int], to: tuple[str, int], delay: float) -> None:
    with socket.create_server(listen, reuse_port=False) as server:
        print(
            f"delaying {listen[0]}:{listen[1]} -> {to[0]}:{to[1]} by {delay * 1e3:g} ms each way", flush=True
        )
        while True:
            client, _ = server.accept()
            upstream = socket.create_connection(to)
            for end in (client, upstream):
                end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _pipe(client, upstream, delay)
            _pipe(upstream, client, delay)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listen", type=_address, default=("127.0.0.1", 6432))
    parser.add_argument("--to", type=_address, default=("127.0.0.1", 5432))
    parser.add_argument("--delay-ms", type=float, default=0.5, help="added to each direction")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.listen, args.to, args.delay_ms / 1e3)


if __name__ == "__main__":
    main()
