"""The echo server on each event loop posguard can run on, measured alternately.

    .venv/bin/python bench/echo_loops.py [--seconds 4] [--repeats 5] [--inflight 1,64] [--reply-bytes 60]

The ceiling every ratio in ``rpc_bench`` and ``pipeline_bench`` is taken against depends on the event loop the
echo server runs on, so the echo must run on the loop the posguard server beside it runs on. This shows by how
much: two echo servers (``bench/echo_server.py --event-loop asyncio`` and ``--event-loop uvloop``) under
``rpc_bench``'s load generator, window after window, and for each number of calls in flight the calls/s of
every window, their medians, the ratio window by window, and the medians of server CPU per call and p50.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys

from rpc_bench import ECHO, ROOT, Process, Window, _start, add_window_arguments, unary_window

from posguard_server.config import EVENT_LOOPS


def _echo(loop: str, reply_bytes: int) -> Process:
    command = [sys.executable, str(ROOT / "bench" / "echo_server.py"), "--reply-bytes", str(reply_bytes)]
    return _start([*command, "--event-loop", loop], r"echo serving on (\d+)")


async def measure(args: argparse.Namespace) -> None:
    requests = [b"\x02" * 40] * (20_000 * int(args.seconds + 1))  # a VerifyCustomerId request's size
    servers = {loop: _echo(loop, args.reply_bytes) for loop in EVENT_LOOPS}
    try:
        for inflight in args.inflight:
            windows: dict[str, list[Window]] = {loop: [] for loop in servers}
            for _ in range(args.repeats):
                for loop, server in servers.items():
                    # The echo checks no key: any token will do.
                    window = await unary_window(server, ECHO, "-", requests, inflight, args.seconds)
                    windows[loop].append(window)
            for loop, measured in windows.items():
                rates = ", ".join(f"{w.rate:,.0f}" for w in measured)
                print(
                    f"{inflight} in flight, {loop}: calls/s {rates} (median "
                    f"{statistics.median(w.rate for w in measured):,.0f}); server CPU ms/call "
                    f"{statistics.median(w.cpu_ms_per_call for w in measured):.3f}; p50 ms "
                    f"{statistics.median(w.p50_ms for w in measured):.3f}"
                )
            first, second = (windows[loop] for loop in EVENT_LOOPS)
            ratios = ", ".join(f"{a.rate / b.rate:.2f}" for a, b in zip(first, second, strict=True))
            print(f"{inflight} in flight, {EVENT_LOOPS[0]} / {EVENT_LOOPS[1]} window by window: {ratios}")
    finally:
        for server in servers.values():
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_window_arguments(parser, seconds=4.0, repeats=5, inflight=[1, 64])
    parser.add_argument("--reply-bytes", type=int, default=60, help="bytes of every answer")
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
