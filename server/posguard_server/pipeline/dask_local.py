"""A real Dask cluster on this machine, as separate processes: for tests, benchmarks and trying things out.

The scheduler and each worker are their own ``dask`` command-line processes, exactly as on a cluster (one
worker process per ``dask worker``, no nanny, so stopping or killing one is a worker dying). Production runs
its own cluster and passes its scheduler address to ``posguard-server retrain --dask-scheduler``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

STARTUP_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class LocalCluster:
    address: str
    scheduler: subprocess.Popen[bytes]
    workers: tuple[subprocess.Popen[bytes], ...]


def _dask(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        # Our own interpreter and fixed arguments: nothing here comes from outside the process.
        return subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "dask", *args], stdout=out, stderr=subprocess.STDOUT
        )


def _wait_for_workers(address: str, count: int, deadline: float) -> None:
    from distributed import Client

    with Client(address, timeout="30s") as client:  # type: ignore[no-untyped-call]
        client.wait_for_workers(count, timeout=max(1.0, deadline - time.monotonic()))


@contextmanager
def local_dask_cluster(workers: int = 2, *, threads: int = 1) -> Iterator[LocalCluster]:
    """Start a scheduler and ``workers`` single-process workers on loopback; stop them all on exit."""
    with tempfile.TemporaryDirectory(prefix="posguard-dask-") as folder:
        root = Path(folder)
        scheduler_file = root / "scheduler.json"
        procs: list[subprocess.Popen[bytes]] = []
        try:
            scheduler = _dask(
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(scheduler_file),
                log=root / "scheduler.log",
            )
            procs.append(scheduler)
            deadline = time.monotonic() + STARTUP_SECONDS
            while not scheduler_file.exists() or not scheduler_file.read_text().strip():
                if scheduler.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the Dask scheduler did not start: " + _tail(root / "scheduler.log"))
                time.sleep(0.1)
            address = str(json.loads(scheduler_file.read_text())["address"])
            started = [
                _dask(
                    "worker",
                    address,
                    "--no-nanny",
                    "--nthreads",
                    str(threads),
                    "--no-dashboard",
                    "--host",
                    "127.0.0.1",
                    "--local-directory",
                    str(root / f"worker-{i}"),
                    log=root / f"worker-{i}.log",
                )
                for i in range(workers)
            ]
            procs += started
            _wait_for_workers(address, workers, deadline)
            yield LocalCluster(address, scheduler, tuple(started))
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return "(no log)"
