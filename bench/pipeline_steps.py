"""Where the request pipeline's time goes in a server under load: its steps, timed by the thread's CPU clock.

    .venv/bin/python bench/pipeline_steps.py [--seconds 4] [--repeats 3] [--inflight 64]

In process (``bench/handler_cost.py``) the pipeline's Python runs on warm caches; in a server, between gRPC's
own work, the same code costs two to three times as much, so where a call's time goes has to be read in the
server. This starts ``pipeline_bench.py``'s server (posguard's pipeline in front of a handler that answers at
once, the JSON access log at INFO) with each step of ``api.pipeline._MethodPipeline`` and a few of the
functions they call wrapped by a timer that adds up the thread's CPU time (``time.thread_time_ns``) spent
inside, loads it with ``rpc_bench``'s load generator for ``--repeats`` windows of ``--seconds``, and prints
each step's CPU per call.

Steps nest (``_unary`` is the whole pipeline and holds the others, ``_end`` holds ``_finish``), and each timer
adds its own cost to the step around it: ``timer`` is that cost, measured in the server (an empty function,
timed once a call). Read the figures as where the time goes, not as exact costs; the server's CPU per call is
higher than ``pipeline_bench.py``'s by the timers.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pipeline_bench
from rpc_bench import VERIFY, _start, add_window_arguments, unary_window

from posguard_server.api import pipeline
from posguard_server.api.auth import ApiKeyAuthenticator
from posguard_server.api.metrics import Tally
from posguard_server.app import run_loop
from posguard_server.logs import AccessLines

# (class, method, is a coroutine function), in the order printed: the pipeline's steps, then what they call.
STEPS: list[tuple[type, str, bool]] = [
    (pipeline._MethodPipeline, "_unary", True),
    (pipeline._MethodPipeline, "_begin", False),
    (pipeline._MethodPipeline, "_known", False),
    (ApiKeyAuthenticator, "verified", False),
    (pipeline._MethodPipeline, "_admit", False),
    (pipeline._MethodPipeline, "_end", False),
    (pipeline._MethodPipeline, "_finish", False),
    (Tally, "observe", False),
    (AccessLines, "write", False),
]
_clock = time.thread_time_ns
_totals: dict[str, list[int]] = {}  # step -> [nanoseconds, calls]


def _timed(function: Callable[..., Any], name: str, coroutine: bool) -> Callable[..., Any]:
    total = _totals.setdefault(name, [0, 0])
    if coroutine:

        @functools.wraps(function)
        async def timed_coroutine(*args: Any, **kwargs: Any) -> Any:
            _empty()  # once a call: what a timer costs in the server
            began = _clock()
            try:
                return await function(*args, **kwargs)
            finally:
                total[0] += _clock() - began
                total[1] += 1

        return timed_coroutine

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        began = _clock()
        try:
            return function(*args, **kwargs)
        finally:
            total[0] += _clock() - began
            total[1] += 1

    return timed


def _nothing() -> None:
    return None


_empty = _timed(_nothing, "timer", False)


def _serve(data_dir: Path) -> None:
    """The pipeline server with its steps timed; the totals go to ``data_dir/steps.json`` when stopped."""
    for owner, name, coroutine in STEPS:
        setattr(owner, name, _timed(getattr(owner, name), name, coroutine))

    def stop(signum: int, frame: FrameType | None) -> None:
        (data_dir / "steps.json").write_text(json.dumps(_totals))
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    settings = pipeline_bench._settings(data_dir)
    run_loop(settings, pipeline_bench.serve(data_dir, 256, handoff=False))


async def measure(args: argparse.Namespace) -> dict[str, list[int]]:
    requests = [b"\x02" * 40] * (20_000 * int(args.seconds + 1))  # a VerifyCustomerId request's size
    with tempfile.TemporaryDirectory(prefix="posguard-steps-") as tmp:
        data_dir = Path(tmp)
        token = pipeline_bench._gateway_key(data_dir)
        server = _start(
            [sys.executable, str(Path(__file__).resolve()), "--serve", str(data_dir)],
            r"pipeline serving on (\d+)",
        )
        try:
            for _ in range(args.repeats):
                window = await unary_window(server, VERIFY, token, requests, args.inflight[0], args.seconds)
                print(
                    f"{window.calls / window.seconds:,.0f} calls/s, "
                    f"server CPU {window.cpu_ms_per_call:.3f} ms/call",
                    file=sys.stderr,
                )
        finally:
            server.popen.terminate()
            server.popen.wait(30)
        totals: dict[str, list[int]] = json.loads((data_dir / "steps.json").read_text())
        return totals


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_window_arguments(parser, inflight=[64])
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the timed server's own process
    args = parser.parse_args()
    if len(args.inflight) != 1:
        parser.error("--inflight takes one value here: the totals are over every window")
    if args.serve is not None:
        _serve(args.serve)
        return
    totals = asyncio.run(measure(args))
    print("| step | µs of CPU per call | calls |")
    print("|---|---|---|")
    for name in ["timer", *(name for _, name, _ in STEPS)]:
        nanoseconds, calls = totals.get(name, [0, 0])
        if calls:
            print(f"| {name} | {nanoseconds / calls / 1e3:.1f} | {calls:,} |")


if __name__ == "__main__":
    main()
