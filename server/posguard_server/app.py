"""Assembling and running the service: ``build_server`` wires the parts, ``serve`` runs until a signal."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import timedelta
from typing import Any, Protocol

import grpc
from grpc import aio
from grpc_health.v1 import _async as health_aio  # the asyncio servicer, exported as health.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from posguard.v1 import (
    admin_pb2_grpc,
    cases_pb2_grpc,
    customer_ids_pb2_grpc,
    policy_pb2_grpc,
    risk_pb2_grpc,
)
from posguard_server.api.access import SERVICE_NAMES
from posguard_server.api.admin import AdminServicer
from posguard_server.api.auth import ApiKeyAuthenticator, Authenticator, NoAuthenticator
from posguard_server.api.cases import CasesServicer
from posguard_server.api.customer_ids import CustomerIdsServicer
from posguard_server.api.enumeration import FailureGuard
from posguard_server.api.group_commit import Writers
from posguard_server.api.health import ServiceHealth
from posguard_server.api.metrics import Metrics
from posguard_server.api.pipeline import ADMIN_CALLS, GATEWAY_CALLS, Admission, RequestPipeline
from posguard_server.api.policy import PolicyServicer
from posguard_server.api.risk import RiskServicer
from posguard_server.config import Settings
from posguard_server.console.server import ConsoleServer
from posguard_server.domain.dynamic_codes import SecretCipher
from posguard_server.domain.enumeration import FailureLimit
from posguard_server.domain.numbering import Numbering
from posguard_server.domain.risk import Decision
from posguard_server.domain.watch import Thresholds as WatchThresholds
from posguard_server.issuers import build_numbering
from posguard_server.scoring import ModelCache, PolicyCache, RiskEngine, Thresholds
from posguard_server.services.backtest import BacktestService
from posguard_server.services.scoring import ScoringService
from posguard_server.services.watch import NumberWatch
from posguard_server.store.api_keys import SqlApiKeyStore
from posguard_server.store.audit import SqlAuditStore
from posguard_server.store.caller_limits import SqlGuessStore
from posguard_server.store.cases import SqlCaseStore
from posguard_server.store.customers import SqlCustomerStore
from posguard_server.store.db import Database
from posguard_server.store.dynamic_codes import SqlDynamicCodeStore
from posguard_server.store.issuance import SqlIssuanceStore
from posguard_server.store.migrate import open_database
from posguard_server.store.model_registry import SqlModelRegistry
from posguard_server.store.outcomes import SqlOutcomeStore
from posguard_server.store.policy import SqlPolicyStore
from posguard_server.store.profiles import SqlProfileStore
from posguard_server.store.redemptions import SqlRedemptionStore
from posguard_server.store.scoring_writes import SqlScoringStore
from posguard_server.store.shadow import SqlShadowStore
from posguard_server.store.verifications import LocalReads, SqlVerificationStore
from posguard_server.store.watch import SqlNumberWatchStore
from posguard_server.store.write_probe import SqlWriteProbeStore

log = logging.getLogger(__name__)


# Requests are small; a bound keeps a hostile client from making the server buffer megabytes.
MAX_MESSAGE_BYTES = 1024 * 1024
# Net allocations between young-generation collections once serving (Python's default: 700).
_YOUNG_COLLECTION_AFTER = 20_000
# Threads reading customers for batches of look-ups (GetCustomer, ResolveExternalId): reads do not wait for
# the writer on SQLite (WAL), so two readers overlap one batch's database time with the next one's Python.
_READ_WORKERS = 2


class Closable(Protocol):
    def close(self) -> None: ...


class PosguardServer:
    """A built, not yet started, posguard server and the parts it owns."""

    def __init__(
        self,
        settings: Settings,
        grpc_server: aio.Server,
        health_servicer: health_aio.HealthServicer,
        database: Database,
        metrics: Metrics,
        *,
        writers: Sequence[Closable] = (),
        flushes: Sequence[Callable[[], Awaitable[None]]] = (),
        health: ServiceHealth | None = None,
        watch: NumberWatch | None = None,
        console: ConsoleServer | None = None,
    ) -> None:
        self.settings = settings
        # The web console, on its own port and this loop (None when console_enabled is off).
        self.console = console
        # The number watch; its background passes run while the server is started (none without an interval).
        self.watch = watch
        self._watching: asyncio.Task[None] | None = None
        self._writers = writers
        self._flushes = flushes  # what was answered and is not written yet, written before the writers stop
        self.health = health if health is not None else ServiceHealth(health_servicer, metrics, SERVICE_NAMES)
        self.grpc_server = grpc_server
        self.database = database
        self.metrics = metrics
        self.metrics_port: int | None = None
        self._health = health_servicer

    @property
    def console_port(self) -> int | None:
        return self.console.port if self.console is not None else None

    async def start(self) -> None:
        await self.grpc_server.start()
        if self.settings.metrics_enabled:
            self.metrics_port = self.metrics.serve_http(
                self.settings.metrics_host, self.settings.metrics_port
            )
        await self.health.start()
        if self.console is not None:
            await self.console.start()
        if self.watch is not None and self.settings.watch_interval_seconds > 0:
            self._watching = asyncio.create_task(self.watch.run_forever(), name="number-watch")

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, give in-flight calls ``grace`` seconds, then release everything."""
        await self._health.enter_graceful_shutdown()
        # Beside the rest: uvicorn's shutdown waits 0.1 s whatever the console is serving.
        console = asyncio.ensure_future(self.console.stop()) if self.console is not None else None
        if self._watching is not None:
            self._watching.cancel()
            await asyncio.gather(self._watching, return_exceptions=True)
        await self.health.stop()
        await self.grpc_server.stop(self.settings.grace_period if grace is None else grace)
        if console is not None:
            await console
        await self.flush()
        for writer in self._writers:
            # Off the loop: a writer may still be committing the batch of a call the grace period cut off.
            await asyncio.to_thread(writer.close)
        self.metrics.stop_http()
        self.database.dispose()

    async def flush(self) -> None:
        """Write what was answered and is not written yet (the counters of successful verifications)."""
        for flush in self._flushes:
            await flush()

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    key_pair = (settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [key_pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def build_authenticator(settings: Settings, keys: SqlApiKeyStore) -> Authenticator:
    """Who may call: API keys from ``keys``, or every caller with every role under ``insecure_no_auth``."""
    if settings.insecure_no_auth:
        log.warning("authentication is OFF (insecure_no_auth): every caller has every role")
        return NoAuthenticator()
    return ApiKeyAuthenticator(
        keys, cache_seconds=settings.auth_cache_seconds, lookup_limit=settings.max_concurrent_auth_lookups
    )


def build_pipeline(settings: Settings, authenticator: Authenticator, metrics: Metrics) -> RequestPipeline:
    """The request pipeline every call passes before its servicer (the benchmark builds it the same way)."""
    limits = {GATEWAY_CALLS: settings.max_concurrent_rpcs, ADMIN_CALLS: settings.max_concurrent_admin_rpcs}
    admission = Admission(limits, metrics)
    return RequestPipeline(
        admission, metrics, authenticator, stream_idle_seconds=settings.stream_idle_seconds
    )


def connection_options(settings: Settings) -> list[tuple[str, int]]:
    """gRPC channel arguments that reap connections: dead peers (keepalive), idle and old connections."""

    def ms(seconds: float) -> int:
        return max(1, round(seconds * 1000))

    options = [("grpc.keepalive_timeout_ms", ms(settings.keepalive_timeout_seconds))]
    if settings.keepalive_seconds:
        # Pinged even with no call in progress: a peer that vanished without closing is found either way.
        options += [("grpc.keepalive_time_ms", ms(settings.keepalive_seconds))]
        options += [("grpc.keepalive_permit_without_calls", 1)]
    if settings.max_connection_idle_seconds:
        options += [("grpc.max_connection_idle_ms", ms(settings.max_connection_idle_seconds))]
    if settings.max_connection_age_seconds:
        options += [("grpc.max_connection_age_ms", ms(settings.max_connection_age_seconds))]
        options += [("grpc.max_connection_age_grace_ms", ms(settings.max_connection_age_grace_seconds))]
    return options


def build_server(settings: Settings, *, reuse_port: bool = False) -> tuple[PosguardServer, int]:
    """Build the server (not started) and bind it; returns it with the port it listens on.

    ``reuse_port`` lets the worker processes of ``serve --workers N`` share one port (SO_REUSEPORT).
    """
    numbering = build_numbering(settings)  # before the database: a bad key ring must not leave it open
    database = open_database(settings.effective_database_url, background_checkpoints=True)
    keys = SqlApiKeyStore(database)
    authenticator = build_authenticator(settings, keys)
    metrics = Metrics()
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Off unless asked for: a second server started by mistake on the same port would otherwise start
        # silently and steal half the calls.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        *connection_options(settings),
    ]
    # Every service registered on it is served through the pipeline, each method composed with it once.
    server = build_pipeline(settings, authenticator, metrics).serve(aio.server(options=options))
    # The gateway RPCs' writes share the database's writer threads (see group_commit).
    # SQLite lets one transaction write at a time; on PostgreSQL the operator chooses (settings).
    writers = Writers(settings.postgres_writers if database.dialect == "postgresql" else 1)
    # One guard for every RPC that names a customer: guesses count together per key.
    limit, code_limit = failure_limits(settings)
    guard = FailureGuard(
        limit, SqlGuessStore(database, limit), metrics, writers, spike_limit=settings.guess_spike_limit
    )
    health_servicer = health_aio.HealthServicer()
    # What health reports: whether writes work (every write tells it; a probe when none comes) and whether
    # the risk models are usable (the model cache tells it).
    health = ServiceHealth(health_servicer, metrics, SERVICE_NAMES)
    database.observe_writes(health.write_result)
    health.watch_writes(SqlWriteProbeStore(database).probe, settings.health_probe_seconds)
    customers, dynamic, registry = (
        SqlCustomerStore(database),
        SqlDynamicCodeStore(database),
        SqlModelRegistry(database),
    )
    readers = Writers(_READ_WORKERS, name="posguard-reader")
    verifications = SqlVerificationStore(database, limit)
    # SQLite's reads are quick enough for the event loop; PostgreSQL's are network round trips.
    local_reads = LocalReads(database) if database.dialect == "sqlite" else None
    redemptions = SqlRedemptionStore(
        database, SecretCipher(dict(numbering.keys.keys)).decrypt, limit, code_limit=code_limit
    )
    customer_ids = CustomerIdsServicer(
        customers,
        numbering,
        dynamic,
        guard,
        verifications,
        redemptions,
        SqlIssuanceStore(database),
        writers,
        readers,
        local_reads,
    )
    customer_ids_pb2_grpc.add_CustomerIdsServicer_to_server(customer_ids, server)
    risk = _risk_servicer(
        database,
        registry,
        customers,
        dynamic,
        numbering,
        settings,
        metrics,
        guard,
        writers,
        health,
        code_limit,
    )
    risk_pb2_grpc.add_RiskServicer_to_server(risk, server)
    admin = AdminServicer(keys, SqlAuditStore(database), authenticator, registry)
    admin_pb2_grpc.add_AdminServicer_to_server(admin, server)
    cases_pb2_grpc.add_CasesServicer_to_server(CasesServicer(SqlCaseStore(database), numbering), server)
    policy_store = SqlPolicyStore(database)
    # One backtest service: the BacktestRules RPC and the console's backtests replay alike.
    backtests = BacktestService(policy_store, time_zone=settings.policy_time_zone)
    policy_pb2_grpc.add_PolicyServicer_to_server(PolicyServicer(policy_store, backtests), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    credentials = _credentials(settings)
    if credentials is None:
        port = server.add_insecure_port(settings.listen)
    else:
        port = server.add_secure_port(settings.listen, credentials)
    if not port:
        database.dispose()
        raise OSError(f"cannot listen on {settings.listen}")
    try:
        console = build_console(
            settings,
            database,
            authenticator,
            keys,
            numbering,
            metrics,
            registry,
            policy_store,
            backtests,
            guard,
        )
    except OSError:
        database.dispose()
        raise
    # The authenticator's key-lookup threads are let go with the writers.
    built = PosguardServer(
        settings,
        server,
        health_servicer,
        database,
        metrics,
        writers=[writers, readers, authenticator, *([local_reads] if local_reads is not None else [])],
        flushes=[customer_ids.flush],
        health=health,
        watch=build_watch(settings, database),
        console=console,
    )
    return built, port


def build_console(
    settings: Settings,
    database: Database,
    authenticator: Authenticator,
    keys: SqlApiKeyStore,
    numbering: Numbering,
    metrics: Metrics,
    registry: SqlModelRegistry,
    policy: SqlPolicyStore,
    backtests: BacktestService,
    guard: FailureGuard,
) -> ConsoleServer | None:
    """The web console on the server's stores and authenticator, its socket bound (None when turned off)."""
    if not settings.console_enabled:
        return None
    from posguard_server.console.app import Console, ConsoleParts
    from posguard_server.console.server import bind
    from posguard_server.console.sessions import SessionStore

    def key_valid(key_id: str) -> bool:
        if settings.insecure_no_auth:
            return True
        found = keys.find_for_auth(key_id)
        return found is not None and not found[0].revoked

    secure = settings.tls_cert_file is not None
    host = settings.console_listen.rpartition(":")[0].strip("[]")
    if not secure and not (host in ("localhost", "::1") or host.startswith("127.")):
        log.warning("the console listens on %s without TLS: sign-ins cross the network in clear", host)
    console = Console(
        ConsoleParts(
            authenticator=authenticator,
            key_valid=key_valid,
            customers=SqlCustomerStore(database),
            cases=SqlCaseStore(database),
            registry=registry,
            audit=SqlAuditStore(database),
            policy=policy,
            backtests=backtests,
            numbering=numbering,
            metrics=metrics.registry,
            reports_dir=settings.effective_reports_dir,
            sessions=SessionStore(settings.console_session_seconds),
            secure=secure,
            guard=guard,
        )
    )
    return ConsoleServer(
        console.app,
        bind(settings.console_listen),
        cert_file=settings.tls_cert_file,
        key_file=settings.tls_key_file,
        client_ca_file=settings.tls_client_ca_file,
        routes=console.routes,
    )


def build_watch(settings: Settings, database: Database) -> NumberWatch:
    """The number watch with the thresholds the settings give."""
    thresholds = WatchThresholds(
        min_events=settings.watch_min_events,
        own_ratio=settings.watch_own_ratio,
        population_ratio=settings.watch_population_ratio,
    )
    return NumberWatch(
        SqlNumberWatchStore(database), thresholds, interval_seconds=settings.watch_interval_seconds
    )


def failure_limits(settings: Settings) -> tuple[FailureLimit, FailureLimit]:
    """Guesses per API key, and wrong codes per dynamic-code enrolment over all keys, per window."""
    window = timedelta(seconds=settings.failure_window_seconds)
    return FailureLimit(settings.failure_limit, window), FailureLimit(settings.code_failure_limit, window)


def _risk_servicer(
    database: Database,
    registry: SqlModelRegistry,
    customers: SqlCustomerStore,
    dynamic: SqlDynamicCodeStore,
    numbering: Numbering,
    settings: Settings,
    metrics: Metrics,
    guard: FailureGuard,
    writers: Writers,
    health: ServiceHealth,
    code_limit: FailureLimit,
) -> RiskServicer:
    """The Risk servicer, the scoring service and the engine behind it, on ``database``."""
    case_decisions = {Decision.REVIEW, Decision.DECLINE} if settings.cases_on_decline else {Decision.REVIEW}
    writes = SqlScoringStore(database, case_decisions=frozenset(case_decisions))
    models = ModelCache(
        registry, SqlShadowStore(database), refresh_seconds=settings.model_refresh_seconds, events=health
    )
    health.watch_models(models.serving, settings.model_refresh_seconds)
    engine = RiskEngine(
        models,
        writes,
        SqlOutcomeStore(database),
        SqlProfileStore(database),
        customers,
        dynamic,
        thresholds=Thresholds(review=settings.risk_review_threshold, decline=settings.risk_decline_threshold),
        no_model_decision=Decision(settings.risk_no_model_decision.upper()),
        # Lists and rules, reloaded as models are: within model_refresh_seconds of a change.
        policy=PolicyCache(SqlPolicyStore(database), refresh_seconds=settings.model_refresh_seconds),
        time_zone=settings.policy_time_zone,
    )
    scoring = ScoringService(
        engine,
        writes,
        open_key=SecretCipher(dict(numbering.keys.keys)).decrypt,
        code_limit=code_limit,
    )
    return RiskServicer(
        engine,
        scoring,
        customers,
        numbering,
        metrics=metrics,
        guard=guard,
        writers=writers,
    )


def serving_line(settings: Settings, port: int) -> str:
    """The line that says the service is up (scripts and tests read the port from it)."""
    host = settings.listen.rpartition(":")[0]
    transport = "TLS" if settings.tls_cert_file else "plaintext"
    workers = f", {settings.workers} workers" if settings.workers > 1 else ""
    return f"posguard serving on {host}:{port} ({transport}{workers})"


async def run_server(
    settings: Settings, *, reuse_port: bool = False, serving: Callable[[int], None] | None = None
) -> None:
    """Serve until SIGTERM or SIGINT. ``serving(port)`` is told once the server is up (default: log it)."""
    server, port = build_server(settings, reuse_port=reuse_port)
    await server.start()
    tune_garbage_collection()
    if serving is None:
        log.info("%s", serving_line(settings, port))
    else:
        serving(port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    log.info("shutting down; in-flight calls have %.1fs", settings.grace_period)
    await server.stop()
    log.info("stopped")


def tune_garbage_collection() -> None:
    """Freeze what start-up made, and collect the young generation less often; called once serving.

    Python's full (generation 2) collection walks every tracked object. Those start-up made (modules, the
    gRPC stack, mappings, the built service: hundreds of thousands) never become garbage, yet under load
    each full collection walked them for 40-90 ms while every call in flight waited. Collected once here and
    then frozen, they are skipped: a full collection walks only what was made since (about 1.5 ms).

    A call allocates thousands of objects that die young, by reference count, before any collection could
    find them; a young collection every ``_YOUNG_COLLECTION_AFTER`` allocations instead of every 700 walks
    the few that survive less often. Both measured with ``bench/revisions_ab.py`` (see the README).
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(_YOUNG_COLLECTION_AFTER, older, oldest)


def serve(settings: Settings) -> int:
    """Run the service until SIGTERM or SIGINT, then shut down gracefully; returns the exit status.

    With ``settings.workers`` above 1, that many processes serve the one port (``posguard_server.workers``).
    """
    if settings.workers > 1:
        from posguard_server.workers import serve_workers

        return serve_workers(settings)
    run_loop(settings, run_server(settings))
    return 0


def run_loop(settings: Settings, main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` to completion on the event loop ``settings.event_loop`` names.

    uvloop is the default: in ``bench/rpc_bench.py`` it took less server CPU per verification and
    redemption than the standard loop, and made no difference to scoring.
    """
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if settings.event_loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)
