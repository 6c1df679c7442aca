"""How long a posguard process takes to start: with the bytecode ``scripts/setup.sh`` compiles, and without.

    .venv/bin/python bench/startup_bench.py [--repeats 5]

Every command of ``posguard-server`` and every server is a new Python process, which first imports its
modules. Where Python may not write its bytecode caches (``PYTHONDONTWRITEBYTECODE``, a read-only file
system) and nothing compiled them at install, each process compiles every module it imports from source.
This runs each command both ways, alternately, ``--repeats`` times, and reports the median wall time of each
and their ratio:

- compiled: the environment as ``scripts/setup.sh`` leaves it, with ``PYTHONDONTWRITEBYTECODE=1`` so that
  no run writes a cache for the next;
- not compiled: the same, with ``PYTHONPYCACHEPREFIX`` pointing at an empty folder, where Python then looks
  for every cache and finds none (and writes none).

The commands: ``posguard-server --help``, ``posguard-server keys list`` on a data directory made beforehand,
``posguard --help`` (the client's command line), and ``posguard-server serve`` until it logs that it serves
(on a free port, SQLite in a data directory made beforehand, then stopped).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
SERVING = "posguard serving on"


def _environment(cache_prefix: str | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPYCACHEPREFIX", None)
    if cache_prefix is not None:
        env["PYTHONPYCACHEPREFIX"] = cache_prefix
    return env


def _run(args: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one command, which must succeed."""
    started = time.perf_counter()
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def _serve(data_dir: Path, env: dict[str, str]) -> float:
    """Wall seconds from starting ``serve`` to its line saying it serves."""
    args = [
        str(VENV_BIN / "posguard-server"),
        "--data-dir",
        str(data_dir),
        "--listen",
        "127.0.0.1:0",
        "--no-metrics-enabled",
        "--no-console-enabled",
        "--log-format",
        "text",
        "serve",
    ]
    started = time.perf_counter()
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    try:
        for line in process.stdout:
            if SERVING in line:
                return time.perf_counter() - started
        raise RuntimeError("serve ended before it served")
    finally:
        process.terminate()
        process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="posguard-startup-") as tmp:
        data_dir, empty = Path(tmp) / "data", Path(tmp) / "no-bytecode"
        empty.mkdir()
        compiled, uncompiled = _environment(None), _environment(str(empty))
        server = str(VENV_BIN / "posguard-server")
        _run([server, "--data-dir", str(data_dir), "keys", "list"], compiled)  # makes the database
        commands: dict[str, Callable[[dict[str, str]], float]] = {
            "posguard-server --help": lambda env: _run([server, "--help"], env),
            "posguard-server keys list": lambda env: _run(
                [server, "--data-dir", str(data_dir), "keys", "list"], env
            ),
            "posguard --help": lambda env: _run([str(VENV_BIN / "posguard"), "--help"], env),
            "posguard-server serve, until it serves": lambda env: _serve(data_dir, env),
        }
        print("| command | compiled (s, median) | not compiled (s, median) | ratio |")
        print("|---|---|---|---|")
        for name, command in commands.items():
            times: dict[str, list[float]] = {"compiled": [], "not compiled": []}
            for _ in range(args.repeats):
                times["compiled"].append(command(compiled))
                times["not compiled"].append(command(uncompiled))
                assert not any(empty.iterdir()), "a run wrote bytecode where none should be"
            fast, slow = (statistics.median(times[mode]) for mode in ("compiled", "not compiled"))
            print(f"| `{name}` | {fast:.2f} | {slow:.2f} | {slow / fast:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
