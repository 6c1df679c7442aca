"""Two revisions of posguard, each in its own server, measured window after window against one echo.

    .venv/bin/python bench/revisions_ab.py --before REV [--after REV]
        [--rpc verify|redeem|score|code|issue|resolve|miss] [--seconds 4] [--repeats 5] [--inflight 64]
        [--postgres URL] [--beside RPC:INFLIGHT]

A change that saves tens of microseconds a call is smaller than the drift of this machine from one run of
``rpc_bench.py`` to the next; measured alternately, each window of one revision beside a window of the other,
both see the same machine. ``--before`` is checked out into a temporary git worktree (``--after`` too when
given; by default it is this working tree, uncommitted changes included), and each server runs that tree's
code (``PYTHONPATH``) on this environment's packages, set up as ``rpc_bench.py`` sets it up (sample history,
trained models, a gateway key; the console off, so both can run). Each round measures the echo, then each
revision, with the same load generator. Reports, per revision, the calls/s of every window and their median,
the ratio of that median to the echo's, the medians of server CPU per call, p50 and p99, and the slowest call
of all its windows. ``--postgres`` (a server URL) runs each revision on a fresh PostgreSQL database of its
own instead of SQLite. ``--rpc miss`` is ResolveExternalId of external ids nobody was linked to: each call
a miss, counted against the key (under a limit no window reaches) and audited. ``--beside miss:16`` sends
that load to the same server during each window (to the echo during the echo's) and reports its calls/s too:
what a key that guesses takes from the gateways' calls.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
from rpc_bench import (
    ECHO,
    ISSUE,
    ISSUE_CODE,
    REDEEM,
    RESOLVE,
    ROOT,
    SCORE,
    VERIFY,
    MakeRequests,
    Process,
    Requests,
    Window,
    _reply_size,
    add_window_arguments,
    echo,
    enroll,
    fetch_numbers,
    posguard,
    unary_window,
)

from posguard_server.store.scratch import scratch_postgres_database

# Each RPC measured: its method, and the requests of it a server's ``Requests`` makes.
RPCS: dict[str, tuple[str, Callable[[Requests], MakeRequests]]] = {
    "verify": (VERIFY, lambda r: r.verifies),
    "redeem": (REDEEM, lambda r: r.redemptions),
    "score": (SCORE, lambda r: r.scores),
    "code": (ISSUE_CODE, lambda r: r.code_issues),
    "issue": (ISSUE, lambda r: r.issues),
    "resolve": (RESOLVE, lambda r: r.resolves),
    "miss": (RESOLVE, lambda r: r.misses),
}
# Flags of the servers for an RPC. Misses: a limit no window reaches, so that one key's misses are counted
# (its row locked and moved, each miss audited) and never refused.
FLAGS = {"miss": ["--failure-limit", "1000000000"]}
# What the calls of an RPC end with, where it is not OK.
ANSWERED = {"miss": grpc.StatusCode.NOT_FOUND}


@contextmanager
def checked_out(revision: str, into: Path) -> Iterator[Path]:
    """``revision`` in a detached worktree at ``into``, removed afterwards."""
    git = ["git", "-C", str(ROOT)]
    subprocess.run([*git, "worktree", "add", "--detach", "--quiet", str(into), revision], check=True)
    try:
        yield into
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(into)], check=True)


def _code_of(tree: Path) -> dict[str, str]:
    """An environment whose imports of posguard's packages come from ``tree``."""
    paths = [str(tree / part) for part in ("server", "models", "clients")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


async def measure(args: argparse.Namespace) -> None:
    method, requests_of = RPCS[args.rpc]
    need = 4000 * int(args.seconds + 1)  # requests a window may use at most, with room to spare
    with tempfile.TemporaryDirectory(prefix="posguard-ab-") as tmp, ExitStack() as stack:
        trees = {"before": stack.enter_context(checked_out(args.before, Path(tmp) / "before-tree"))}
        trees["after"] = (
            stack.enter_context(checked_out(args.after, Path(tmp) / "after-tree")) if args.after else ROOT
        )
        servers: dict[str, tuple[Process, str, Requests]] = {}
        loads = dict.fromkeys([args.rpc, *([args.beside[0]] if args.beside else [])])
        flags = [flag for rpc in loads for flag in FLAGS.get(rpc, [])]
        for name, tree in trees.items():
            url = (
                stack.enter_context(scratch_postgres_database(args.postgres, f"posguard_ab_{name}"))
                if args.postgres
                else None
            )
            process, token = stack.enter_context(
                posguard(
                    Path(tmp) / name,
                    url,
                    "--no-console-enabled",
                    *flags,
                    env=_code_of(tree),
                )
            )
            requests = Requests()
            requests.numbers = await fetch_numbers(process.port, token, requests.refs)
            if {"redeem", "code"} & loads.keys():
                requests.secrets = await enroll(process.port, token, requests.numbers)
            servers[name] = (process, token, requests)
        first, first_token, first_requests = servers["before"]
        baseline = stack.enter_context(echo(await _reply_size(first, first_token, first_requests)))
        answered = ANSWERED.get(args.rpc, grpc.StatusCode.OK)

        async def window(
            process: Process, token: str, requests: Requests, inflight: int
        ) -> tuple[Window, Window | None]:
            """A window of ``args.rpc``, and of the ``--beside`` load sent at the same time (None: none)."""
            target = ECHO if process is baseline else method
            measured = unary_window(
                process, target, token, requests_of(requests)(need), inflight, args.seconds, answered=answered
            )
            if args.beside is None:
                return await measured, None
            rpc, beside_inflight = args.beside
            beside_method, beside_of = RPCS[rpc]
            beside = unary_window(
                process,
                ECHO if process is baseline else beside_method,
                token,
                beside_of(requests)(need),
                beside_inflight,
                args.seconds,
                answered=ANSWERED.get(rpc, grpc.StatusCode.OK),
            )
            return await asyncio.gather(measured, beside)

        for inflight in args.inflight:
            echoed: list[Window] = []
            measured: dict[str, list[Window]] = {name: [] for name in servers}
            besides: dict[str, list[Window]] = {name: [] for name in servers}
            for _ in range(args.repeats):
                # The echo checks no key and answers any bytes: the first server's requests will do.
                echoed.append((await window(baseline, first_token, first_requests, inflight))[0])
                for name, (process, token, requests) in servers.items():
                    ours, beside = await window(process, token, requests, inflight)
                    measured[name].append(ours)
                    if beside is not None:
                        besides[name].append(beside)
            _report(args.rpc, inflight, echoed, measured)
            if args.beside is not None:
                for name, windows in besides.items():
                    rates = ", ".join(f"{w.rate:,.0f}" for w in windows)
                    rpc, beside_inflight = args.beside
                    print(f"  beside it, {rpc} at {beside_inflight} in flight, {name}: calls/s {rates}")


def _report(rpc: str, inflight: int, echoed: list[Window], measured: dict[str, list[Window]]) -> None:
    def line(name: str, windows: list[Window]) -> str:
        rates = ", ".join(f"{w.rate:,.0f}" for w in windows)
        rate = statistics.median(w.rate for w in windows)
        cpu = statistics.median(w.cpu_ms_per_call for w in windows)
        p50 = statistics.median(w.p50_ms for w in windows)
        p99 = statistics.median(w.p99_ms for w in windows)
        slowest = max(w.max_ms for w in windows)
        return (
            f"{name}: calls/s {rates} (median {rate:,.0f}); server CPU ms/call {cpu:.3f}; "
            f"p50 ms {p50:.2f}; p99 ms {p99:.2f}; slowest call ms {slowest:.1f}"
        )

    echo_rate = statistics.median(w.rate for w in echoed)
    print(f"{rpc}, {inflight} in flight")
    print("  " + line("echo", echoed))
    for name, windows in measured.items():
        ratio = statistics.median(w.rate for w in windows) / echo_rate
        print(f"  {line(name, windows)}; ratio to the echo {ratio:.3f}")


def _beside(text: str) -> tuple[str, int]:
    rpc, _, inflight = text.partition(":")
    if rpc not in RPCS or not inflight.isdigit() or int(inflight) < 1:
        raise argparse.ArgumentTypeError(f"expected RPC:INFLIGHT with RPC one of {', '.join(sorted(RPCS))}")
    return rpc, int(inflight)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_window_arguments(parser, seconds=4.0, repeats=5, inflight=[64])
    parser.add_argument("--before", required=True, help="the revision to compare against, e.g. HEAD~1")
    parser.add_argument("--after", help="the other revision (default: this working tree)")
    parser.add_argument("--rpc", choices=sorted(RPCS), default="verify")
    parser.add_argument("--postgres", help="PostgreSQL server URL; each revision gets a fresh database")
    parser.add_argument(
        "--beside",
        type=_beside,
        help="RPC:INFLIGHT, e.g. miss:16: that load sent to the same server during each window (to the echo "
        "during the echo's), to see what it takes from --rpc",
    )
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
