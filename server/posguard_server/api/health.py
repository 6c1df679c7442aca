"""What the health service says, from what the server sees: whether writes work and a risk model is usable.

The server as a whole (service name "") is SERVING from start to shutdown: it answers, and restarting it
would mend neither a database nor a model. Each service reports whether it can do its work:

- ``CustomerIds``, ``Risk`` and ``Admin`` all write to the database. When a write fails because of the
  database (unreachable, full, locked past its busy timeout), they report NOT_SERVING; the next write that
  commits, a call's or the probe's, makes them SERVING again.
- ``Risk`` also reports NOT_SERVING while a global model is active in the registry but this server has no
  usable one (the answers are then the configured no-model decision). No model active yet is a stage of a
  new installation, not a failure: Risk serves, and the answers are the same no-model decision.

How the server learns: every write unit of work tells ``write_result`` how it ended
(``Database.observe_writes``). A server that wrote nothing for ``health_probe_seconds`` (an idle one, or one
that load balancers stopped calling because it reported NOT_SERVING) writes one row itself, so that health
turns both ways without traffic. The risk models are refreshed on their own schedule too, so a promotion
that mends a damaged model is seen without traffic. Each change is logged once, at WARNING, and shown by the
``posguard_degraded`` gauge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2

from posguard.v1 import risk_pb2
from posguard_server.api.metrics import Metrics

log = logging.getLogger(__name__)

RISK_SERVICE = risk_pb2.DESCRIPTOR.services_by_name["Risk"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServiceHealth:
    """The health of each service, kept from events on any thread and published on the server's loop.

    Implements ``scoring.ModelEvents`` (the model cache's events) and observes the database's writes.
    """

    def __init__(
        self,
        servicer: health_aio.HealthServicer,
        metrics: Metrics,
        services: Sequence[str],
    ) -> None:
        self._servicer = servicer
        self._metrics = metrics
        self._services = tuple(services)
        self._risk = RISK_SERVICE
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writes_fail = False
        self._model_unusable = False
        self._last_write_ok = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []
        self._jobs: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._refreshes: list[Callable[[], object]] = []

    # -- events, from any thread ------------------------------------------------------------------------

    def write_result(self, ok: bool) -> None:
        """How a write unit of work ended (``Database.observe_writes``): on every commit, so cheap."""
        if ok:
            self._last_write_ok = time.monotonic()
            if not self._writes_fail:
                return
        elif self._writes_fail:
            return
        self._change(writes_fail=not ok)

    def model_load_failed(self, kind: str) -> None:
        self._metrics.model_load_failures.labels(kind).inc()

    def risk_model_usable(self, usable: bool) -> None:
        if self._model_unusable == (not usable):
            return
        self._change(model_unusable=not usable)

    def _change(self, *, writes_fail: bool | None = None, model_unusable: bool | None = None) -> None:
        with self._lock:
            if writes_fail is not None and writes_fail != self._writes_fail:
                self._writes_fail = writes_fail
                self._metrics.degraded.labels("storage").set(1 if writes_fail else 0)
                if writes_fail:
                    log.warning(
                        "writes to the database fail: %s report NOT_SERVING until a write commits again",
                        ", ".join(self._services),
                    )
                else:
                    log.warning("writes to the database work again: the services report SERVING")
            if model_unusable is not None and model_unusable != self._model_unusable:
                self._model_unusable = model_unusable
                self._metrics.degraded.labels("risk_model").set(1 if model_unusable else 0)
                if model_unusable:
                    log.warning(
                        "no usable risk model: %s reports NOT_SERVING and answers the no-model decision "
                        "(risk_no_model_decision) until a global model loads",
                        self._risk,
                    )
                else:
                    log.warning("a risk model is usable again: %s scores transactions", self._risk)
            loop = self._loop
        if loop is not None:
            # A loop that has closed (RuntimeError) has nobody left to report to.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._publish_soon)

    # -- on the server's loop ---------------------------------------------------------------------------

    def statuses(self) -> dict[str, health_pb2.HealthCheckResponse.ServingStatus.ValueType]:
        """What each service reports now ("" is the server as a whole)."""
        with self._lock:
            writes_fail, model_unusable = self._writes_fail, self._model_unusable
        statuses = {"": _SERVING}
        for name in self._services:
            down = writes_fail or (name == self._risk and model_unusable)
            statuses[name] = _NOT_SERVING if down else _SERVING
        return statuses

    async def publish(self) -> None:
        """Set the health service to ``statuses`` (ignored once shutdown has begun)."""
        for name, status in self.statuses().items():
            await self._servicer.set(name, status)

    def _publish_soon(self) -> None:
        # Published in full each time: the latest state wins, whatever order the events came in.
        task = asyncio.get_running_loop().create_task(self.publish())
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    def watch_writes(self, probe: Callable[[datetime], None], seconds: float) -> None:
        """Once started, write with ``probe`` whenever nothing committed for ``seconds``."""
        self._jobs.append(lambda: self._probe_writes(probe, seconds))

    def watch_models(self, refresh: Callable[[], object], seconds: float) -> None:
        """Load the risk models with ``refresh`` at start, then every ``seconds``, calls or none."""
        self._refreshes.append(refresh)
        self._jobs.append(lambda: self._refresh_loop(refresh, seconds))

    async def start(self) -> None:
        """Publish the current state and keep it true from now on (the watches)."""
        self._loop = asyncio.get_running_loop()
        # The models first: a global model that cannot be loaded at start-up is reported before any call.
        for refresh in self._refreshes:
            await self._refresh_models(refresh)
        await self.publish()
        for job in self._jobs:
            self._tasks.append(self._loop.create_task(job()))

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._loop = None

    async def _probe_writes(self, probe: Callable[[datetime], None], seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            if not self._writes_fail and time.monotonic() - self._last_write_ok < seconds:
                continue  # a write committed meanwhile: that says enough
            try:
                await asyncio.to_thread(probe, datetime.now(UTC))
            except Exception:
                # Whatever stops the probe stops writes: the database's errors were reported by the write
                # itself, anything else (a read-only database) is reported here.
                log.debug("the write probe failed", exc_info=True)
                self.write_result(False)

    async def _refresh_models(self, refresh: Callable[[], object]) -> None:
        try:
            await asyncio.to_thread(refresh)
        except Exception:
            # The registry could not be read (the database is down): the writes' health says so; the models
            # are read again at the next refresh, or by the next call.
            log.debug("the model refresh failed", exc_info=True)

    async def _refresh_loop(self, refresh: Callable[[], object], seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            await self._refresh_models(refresh)
