"""Serving from several processes on one port: ``posguard-server serve --workers N``.

A Python process runs one thread of Python at a time, so the CPU-bound parts of a call (decoding,
validation, the ORM, scoring) use at most one core per process. N worker processes bind the same port with
SO_REUSEPORT and the kernel spreads new connections among them. The parent first does once what must not
race (creating the number key ring on a first start, migrating the embedded SQLite schema), starts the
workers, says the service is up when every worker serves, and passes SIGTERM/SIGINT on. If a worker dies,
the parent stops the others and exits non-zero: the service supervisor (systemd, Kubernetes) restarts the
whole service, which is simpler to reason about than a half-restarted one.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from types import FrameType

from posguard_server.app import run_loop, run_server, serving_line
from posguard_server.config import Settings
from posguard_server.issuers import build_numbering
from posguard_server.logs import configure_logging, stop_logging
from posguard_server.store.migrate import open_database

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 60.0
# Beyond the grace period the workers give in-flight calls, how long the parent waits before SIGKILL.
_STOP_MARGIN_S = 5.0

# What a worker reports: (index, pid) once serving, or (index, message) when it could not start.
Report = tuple[int, int | str]


def serve_workers(settings: Settings) -> int:
    """Run ``settings.workers`` worker processes on one port until a signal; returns the exit status."""
    build_numbering(settings)  # creates the key ring file on a first start, before workers could race
    open_database(
        settings.effective_database_url
    ).dispose()  # migrates the embedded schema once; checks a shared one
    host, _, port_text = settings.listen.rpartition(":")
    port, reserved = int(port_text), None
    if port == 0:
        reserved, port = _reserve_port(host)  # every worker must bind the same free port
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no gRPC state forked
    reports: Queue[Report] = context.Queue()
    workers = [
        context.Process(
            target=_worker,
            args=(index, _worker_settings(settings, index, f"{host}:{port}"), reports),
            name=f"posguard-worker-{index}",
        )
        for index in range(settings.workers)
    ]
    for worker in workers:
        worker.start()
    try:
        status = _wait_until_serving(workers, reports, stopping)
        if reserved is not None:
            reserved.close()
        if status == 0:
            log.info("%s", serving_line(settings, port))
            status = _supervise(workers, stopping)
    finally:
        _stop(workers, settings.grace_period + _STOP_MARGIN_S)
    log.info("stopped")
    return status


def _worker_settings(settings: Settings, index: int, listen: str) -> Settings:
    metrics_port = settings.metrics_port + index if settings.metrics_port else 0
    # Console sessions live in one process's memory: only the first worker serves the console.
    console = settings.console_enabled and index == 0
    return settings.model_copy(
        update={"listen": listen, "workers": 1, "metrics_port": metrics_port, "console_enabled": console}
    )


def _reserve_port(host: str) -> tuple[socket.socket, int]:
    """A free port, held (bound, not listening) until the workers have bound it too."""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((bare, 0))
    return holder, int(holder.getsockname()[1])


def _worker(index: int, settings: Settings, reports: Queue[Report]) -> None:
    configure_logging(settings.log_level_number, settings.log_format, background=True)

    def serving(port: int) -> None:
        log.info("worker %d serving on port %d", index, port)
        reports.put((index, os.getpid()))

    try:
        run_loop(settings, run_server(settings, reuse_port=True, serving=serving))
    except Exception as error:
        # The parent prints why; the message names a setting or a file, never a secret.
        log.exception("worker %d stopped", index)
        reports.put((index, f"{type(error).__name__}: {error}"))
        raise SystemExit(1) from None
    finally:
        stop_logging()


def _wait_until_serving(
    workers: Sequence[BaseProcess], reports: Queue[Report], stopping: threading.Event
) -> int:
    serving: set[int] = set()
    deadline = time.monotonic() + _START_TIMEOUT_S
    while len(serving) < len(workers):
        if stopping.is_set():
            return 0
        if time.monotonic() > deadline:
            log.error("workers did not start within %.0fs", _START_TIMEOUT_S)
            return 1
        try:
            index, outcome = reports.get(timeout=0.2)
        except queue.Empty:
            if any(worker.exitcode is not None for worker in workers):
                codes = [worker.exitcode for worker in workers]
                log.error("a worker exited while starting (exit statuses %s)", codes)
                return 1
            continue
        if isinstance(outcome, str):
            log.error("worker %d could not start: %s", index, outcome)
            return 1
        serving.add(index)
    return 0


def _supervise(workers: Sequence[BaseProcess], stopping: threading.Event) -> int:
    while not stopping.is_set():
        wait([worker.sentinel for worker in workers], timeout=0.5)
        for worker in workers:
            if worker.exitcode is not None and not stopping.is_set():
                log.error("%s exited with status %s; stopping the service", worker.name, worker.exitcode)
                return 1
    log.info("shutting down %d workers", len(workers))
    return 0


def _stop(workers: Sequence[BaseProcess], timeout: float) -> None:
    """SIGTERM every worker (each stops gracefully), then SIGKILL what is left after ``timeout``."""
    for worker in workers:
        if worker.pid is not None and worker.exitcode is None:
            os.kill(worker.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.exitcode is None:
            log.warning("%s did not stop in time; killing it", worker.name)
            worker.kill()
            worker.join()
