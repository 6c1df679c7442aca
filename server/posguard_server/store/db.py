"""The database handle: engine set-up per backend and the units of work every store uses.

``Database.session()`` (and, for the gateway units, ``Database.statements_unit()``, which ends the same way)
is the only place that commits, rolls back and closes, and the only place that turns driver exceptions into
domain errors, so stores stay free of ``try``/``except`` around SQL and no driver message can reach a client.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, cast

from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.orm import Session, sessionmaker

from posguard_server.domain.deadlines import check_deadline, current_deadline
from posguard_server.domain.errors import AlreadyExists, DeadlineExceeded, PosguardError, Unavailable
from posguard_server.store.driver import POSTGRESQL, DriverConnection

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import psycopg
    from sqlalchemy.pool import ConnectionPoolEntry


log = logging.getLogger(__name__)

_T = TypeVar("_T")
# How often a unit of work that lost a race on a unique constraint is run before the error goes out.
CONFLICT_ATTEMPTS = 3


class _HideRowValues(logging.Filter):
    """Blanks the values of SQLAlchemy's DEBUG "Row %r" records and keeps the line.

    With ``hide_parameters`` these are the one place stored values (customer numbers, idempotent answers)
    still reach a log: whenever anyone sets the ``sqlalchemy.engine`` logger to DEBUG to look at queries.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Row %r":
            record.msg, record.args = "Row [values hidden]", ()
        return True


# Engines without a logging_name (ours) log through this one logger; a filter on it sees every row record.
logging.getLogger("sqlalchemy.engine.Engine").addFilter(_HideRowValues())

_READ_ONLY_OPTION = "posguard_read_only"

# A stalled connect must fail within an RPC deadline, so clients see UNAVAILABLE and retry elsewhere.
_PG_CONNECT_TIMEOUT_S = 3
# psycopg prepares a statement on the server once it has run a few times, and PostgreSQL then plans it once
# for any parameters (a generic plan) if that looks no dearer than planning per execution. A plan made while
# a table was small stays a sequential scan as the table grows, until the next ANALYZE: redemptions on a new
# database read dynamic_code_attempts by sequential scan (626 scans, 6.2 million rows in 20 s) and slowed
# from 1,460 to 860 calls/s within two minutes. The gateway's statements are short indexed reads and writes,
# cheap to plan each time with the parameters at hand.
_PG_OPTIONS = "-c plan_cache_mode=force_custom_plan"
# How long a gateway unit run for calls without a deadline waits for a row lock on PostgreSQL: a writer thread
# serves every gateway call of the process, so none may wait on a lock for as long as it is held.
_GATEWAY_LOCK_WAIT_S = 10.0
# Waiting longer than this for a pooled connection means the service is overloaded; fail fast instead.
_POOL_TIMEOUT_S = 5.0
# Recycle before typical server/proxy idle cut-offs, so a ping rarely has to discard a connection.
_POOL_RECYCLE_S = 1800
_SQLITE_BUSY_TIMEOUT_MS = 5000
# How often _Checkpoints moves the WAL into the database file.
_CHECKPOINT_EVERY_S = 0.25
# A PostgreSQL connection idle this long is pinged before use (see _ping_idle_connections).
_PING_AFTER_IDLE_S = 10.0
_IDLE_SINCE = "posguard_idle_since"


def normalize_url(url: str) -> str:
    """Pick the psycopg 3 driver for bare PostgreSQL URLs; everything else is returned unchanged."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _sqlite_file(url: URL) -> Path:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        # Each pooled connection would get its own empty in-memory database, and the server uses many.
        raise ValueError("SQLite needs a database file, e.g. sqlite:///var/posguard.db")
    return Path(database)


class Database:
    """An engine plus the units of work. One per process; safe to share between threads."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        max_overflow: int = 10,
        background_checkpoints: bool = False,
    ) -> None:
        """``background_checkpoints`` (SQLite; the server's): the WAL is copied into the database file by
        a thread of this handle's own (``_Checkpoints``) instead of by whichever commit fills it."""
        self._url = make_url(normalize_url(url))
        backend = self._url.get_backend_name()
        # While set, connections leave checkpoints to it (see ``_configure_sqlite``).
        self._checkpoints: _Checkpoints | None = None
        if backend == "sqlite":
            self._engine = self._sqlite_engine(pool_size=pool_size, max_overflow=max_overflow)
            if background_checkpoints:
                self._checkpoints = _Checkpoints(_sqlite_file(self._url))
        elif backend == "postgresql":
            self._engine = self._postgresql_engine(pool_size=pool_size, max_overflow=max_overflow)
        else:
            raise ValueError(f"unsupported database backend {backend!r}: use sqlite or postgresql")
        self._sessions = sessionmaker(bind=self._engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(
            bind=self._engine.execution_options(**{_READ_ONLY_OPTION: True}), expire_on_commit=False
        )
        self._write_observers: list[Callable[[bool], None]] = []
        # sqlite_unit's connections not in use.
        self._driver_lock = threading.Lock()
        self._driver_idle: list[sqlite3.Connection] = []

    def _sqlite_engine(self, *, pool_size: int, max_overflow: int) -> Engine:
        path = _sqlite_file(self._url)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created owner-only before SQLite opens it (an empty file is an empty database): the file holds
        # encrypted holder data and the audit log, and SQLite gives its -wal and -shm files the same mode.
        # OSError: it exists (its mode is then the operator's), or cannot be made (SQLite says why on open).
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        engine = create_engine(
            self._url.set(drivername="sqlite+pysqlite"),
            # The gRPC server runs the store on worker threads; the pool hands a connection to one at a time.
            connect_args={"check_same_thread": False},
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=_POOL_TIMEOUT_S,
            hide_parameters=True,
        )

        def on_connect(dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:
            _configure_sqlite(dbapi_connection, auto_checkpoint=self._checkpoints is None)

        event.listen(engine, "connect", on_connect)
        event.listen(engine, "begin", _on_sqlite_begin)
        return engine

    def _postgresql_engine(self, *, pool_size: int, max_overflow: int) -> Engine:
        connect_args: dict[str, Any] = {}
        # Settings spelled out in the URL win over our defaults.
        if "connect_timeout" not in self._url.query:
            connect_args["connect_timeout"] = _PG_CONNECT_TIMEOUT_S
        if "application_name" not in self._url.query:
            connect_args["application_name"] = "posguard"
        if "options" not in self._url.query:
            connect_args["options"] = _PG_OPTIONS
        engine = create_engine(
            self._url,
            connect_args=connect_args,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=_POOL_TIMEOUT_S,
            pool_recycle=_POOL_RECYCLE_S,
            # Parameters can hold secrets and customer numbers; keep them out of exception text and logs.
            hide_parameters=True,
        )
        _ping_idle_connections(engine)
        event.listen(engine, "begin", _on_postgresql_begin)
        return engine

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._engine.dialect.name

    @property
    def engine(self) -> Engine:
        return self._engine

    def sqlite_reader(self) -> sqlite3.Connection:
        """A connection of the sqlite3 driver itself to this SQLite database, for reads on a hot path.

        Read-only (``query_only``), in autocommit mode (each statement reads what is committed when it runs)
        and without a busy timeout: a read that would wait fails at once (``sqlite3.OperationalError``), so it
        can run where waiting is not allowed. ValueError on PostgreSQL. The caller closes it.
        """
        if self.dialect != "sqlite":
            raise ValueError("only a SQLite database has a sqlite3 reader")
        connection = sqlite3.connect(
            _sqlite_file(self._url), timeout=0, isolation_level=None, check_same_thread=False
        )
        connection.execute("PRAGMA query_only = ON")
        return connection

    def observe_writes(self, observer: Callable[[bool], None]) -> None:
        """Tell ``observer`` how every write unit of work ends: True once it committed, False when the
        database failed it (unreachable, full, locked past the busy timeout). Business refusals, deadlines
        and a pool with no free connection (overload, which load shedding answers) tell nothing.

        It runs on the thread that wrote, once per commit: it must be quick and thread-safe.
        """
        self._write_observers.append(observer)

    def _wrote(self, ok: bool) -> None:
        for observer in self._write_observers:
            observer(ok)

    @contextmanager
    def session(self, *, read_only: bool = False) -> Iterator[Session]:
        """The unit of work: commit on success, roll back on any exception, always close.

        Driver errors leave as domain errors (``AlreadyExists`` for a constraint violation, ``Unavailable``
        when the database cannot be reached); a ``PosguardError`` raised inside passes through unchanged.
        Past the current call's deadline (``domain.deadlines``) the block does not start, or rolls back
        with ``DeadlineExceeded`` instead of committing.

        On PostgreSQL a write unit run under a deadline waits for a row lock only until then (``SET LOCAL
        lock_timeout`` as it begins), and then rolls back with ``DeadlineExceeded``: a lock held elsewhere (an
        operator's transaction, a stalled process) would otherwise hold the unit, and on a writer thread
        every gateway call behind it, for as long as it is held.

        ``read_only=True`` promises the block only reads. On SQLite it lets the transaction run concurrently
        with others; otherwise a transaction takes SQLite's write lock when it begins, so read-then-write
        logic (check, then insert or update) cannot interleave with another writer. PostgreSQL ignores it.
        """
        check_deadline()  # a caller that has already given up gets no work done
        session = (self._read_sessions if read_only else self._sessions)()
        try:
            with self._ending(session.rollback, read_only=read_only):
                yield session
                # The last moment to change course: past the caller's deadline, roll back rather than write
                # an answer nobody will receive. (A deadline passing during the commit itself leaves a whole,
                # committed unit of work, which a retry with the same request id replays.)
                check_deadline()
                session.commit()
        finally:
            session.close()

    @contextmanager
    def sqlite_unit(self, *, read_only: bool = False) -> Iterator[sqlite3.Connection]:
        """A write unit of work on a connection of the sqlite3 driver itself: ``session()``'s contract.

        For the scoring unit (``store.driver``), where SQLAlchemy's own work per transaction cost more
        than the transaction. It begins with the write lock (``BEGIN IMMEDIATE``) like a session, commits on
        success and rolls back on any exception; errors leave as ``session()``'s do. Connections are kept
        for the next unit (one per thread writing at once), configured as the engine's are. ValueError on
        PostgreSQL.

        ``read_only=True``, as for a session: the unit begins without the write lock (``BEGIN``) and runs
        beside a writer, reading one snapshot.
        """
        if self.dialect != "sqlite":
            raise ValueError("only a SQLite database has sqlite3 units")
        check_deadline()
        connection = self._driver_connection()
        healthy = False
        try:
            with self._ending(connection.rollback, read_only=read_only):
                connection.execute("BEGIN" if read_only else "BEGIN IMMEDIATE")
                yield connection
                check_deadline()
                connection.execute("COMMIT")
            healthy = True
        except PosguardError as error:
            # A refusal or a deadline leaves the connection as good as it was; a database failure may not.
            healthy = not isinstance(error, Unavailable)
            raise
        finally:
            if healthy and not connection.in_transaction:
                with self._driver_lock:
                    self._driver_idle.append(connection)
            else:
                connection.close()

    @contextmanager
    def statements_unit(self, *, read_only: bool = False) -> Iterator[DriverConnection]:
        """A write unit of work for SQLAlchemy Core statements only, with ``session()``'s contract.

        For the gateway hot paths, whose statements are all Core: no ORM session is made for them, and they
        run through the driver itself (``store.driver``): on SQLite on a sqlite3 connection (``sqlite_unit``),
        on PostgreSQL on the psycopg connection of a pooled one, in one transaction.

        On PostgreSQL a statement waits for a row lock only until the current deadline, as in a session:
        here the deadline of a batch is the latest of its callers'. Without one (a caller that set none), it
        waits at most ``_GATEWAY_LOCK_WAIT_S``.

        ``read_only=True`` promises the unit only reads, as for a session (the gateway's look-ups): on SQLite
        it runs beside the writer; on PostgreSQL it is a read-only transaction, which takes no row locks to
        wait for.
        """
        if self.dialect == "sqlite":
            with self.sqlite_unit(read_only=read_only) as sqlite_connection:
                yield DriverConnection(sqlite_connection)
            return
        check_deadline()
        if read_only:
            begin: tuple[str, ...] = ("BEGIN READ ONLY",)
        else:
            deadline = current_deadline()
            if deadline is None:
                deadline = time.monotonic() + _GATEWAY_LOCK_WAIT_S
            begin = ("BEGIN", _lock_timeout(deadline))
        with self._ending(_nothing, read_only=read_only):
            # A failure to connect, or a pool with no free connection, ends here too.
            pooled = self._engine.raw_connection()
            connection = cast("psycopg.Connection[Any]", pooled.driver_connection)
            unit = DriverConnection(connection, POSTGRESQL, begin=begin)
            try:
                # The unit sends its own BEGIN, with its first statements (DriverConnection): psycopg's would
                # be a round trip of its own, even in pipeline mode. So psycopg must not begin one itself.
                connection.autocommit = True
                yield unit
                check_deadline()
                unit.end("COMMIT")
            except BaseException as exc:
                _rollback_quietly(lambda: unit.end("ROLLBACK"))
                if connection.broken or connection.closed:
                    # As SQLAlchemy does with a connection that failed: the pool makes a new one.
                    pooled.invalidate(exc)
                raise
            finally:
                _give_back(pooled, connection)

    def _driver_connection(self) -> sqlite3.Connection:
        with self._driver_lock:
            if self._driver_idle:
                return self._driver_idle.pop()
        connection = sqlite3.connect(
            _sqlite_file(self._url),
            timeout=_SQLITE_BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        _configure_sqlite(connection, auto_checkpoint=self._checkpoints is None)
        return connection

    @contextmanager
    def _ending(self, rollback: Callable[[], object], *, read_only: bool) -> Iterator[None]:
        """How a unit of work ends: on an exception, roll back and raise it as a domain error where it is one;
        either way, tell the write observers."""
        try:
            yield
        except BaseException as exc:
            _rollback_quietly(rollback)
            if isinstance(exc, PosguardError) or not isinstance(exc, Exception):
                raise
            translated = translate_error(exc)
            if translated is None:
                raise
            # A pool with no free connection (sa_exc.TimeoutError) is overload, not a failing database.
            failed = isinstance(translated, Unavailable) and not isinstance(exc, sa_exc.TimeoutError)
            if failed and not read_only:
                self._wrote(False)
            raise translated from exc
        else:
            if not read_only:
                self._wrote(True)

    def dispose(self) -> None:
        """Close every pooled connection; the engine reconnects if used again. Background checkpoints stop
        after a last one."""
        if self._checkpoints is not None:
            self._checkpoints.stop()
            # Connections made if the handle is used again checkpoint as SQLite does: no thread does it now.
            self._checkpoints = None
        self._engine.dispose()
        with self._driver_lock:
            idle, self._driver_idle = self._driver_idle, []
        for connection in idle:
            connection.close()

    def __repr__(self) -> str:
        return f"Database({self._url.render_as_string(hide_password=True)!r})"


class _Checkpoints:
    """Copies an SQLite database's WAL into its file on a thread of its own, every ``_CHECKPOINT_EVERY_S``.

    SQLite otherwise checkpoints inside the commit that grows the WAL past 1,000 pages: that caller waits for
    the copy and the database file's sync. A passive checkpoint never waits for readers or writers; what it
    cannot copy yet (a reader still needs it) waits for the next round, as it would have in a commit.
    """

    def __init__(self, path: Path) -> None:
        # Opened here, so a database that cannot be opened fails the handle rather than leave commits that
        # never checkpoint.
        self._connection = sqlite3.connect(
            path, timeout=_CHECKPOINT_EVERY_S, isolation_level=None, check_same_thread=False
        )
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="posguard-checkpoints", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            while True:
                stopping = self._stopping.wait(_CHECKPOINT_EVERY_S)
                try:
                    self._connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as error:
                    # Busy (another process's checkpoint) or failing: the next round tries again, and a
                    # database that fails shows in the write units' health (observe_writes).
                    log.debug("background checkpoint did not run: %s", type(error).__name__)
                if stopping:
                    return
        finally:
            self._connection.close()


def _lock_timeout(deadline: float) -> str:
    """The statement that ends a transaction's lock waits at ``deadline`` (``time.monotonic()``)."""
    milliseconds = max(1, math.ceil((deadline - time.monotonic()) * 1000))
    # An integer made here, not a value of the caller's: SET takes no bound parameters.
    return f"SET LOCAL lock_timeout = {milliseconds}"


def rerun_on_conflict(run: Callable[[], _T]) -> _T:
    """``run()`` (a whole unit of work), run again when it lost a race on a unique constraint.

    ``AlreadyExists`` means another transaction wrote the same key after ``run`` read: run again, it sees
    the winner and decides accordingly. The error of the last of ``CONFLICT_ATTEMPTS`` runs goes out.
    """
    for attempt in range(CONFLICT_ATTEMPTS):
        try:
            return run()
        except AlreadyExists:
            if attempt == CONFLICT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def translate_error(exc: BaseException) -> PosguardError | None:
    """The domain error a driver exception stands for, or None when it is not a database condition."""
    pg = _psycopg()
    if isinstance(exc, (sa_exc.IntegrityError, sqlite3.IntegrityError, *pg.integrity)):
        log.warning("database rejected a write: %s", _describe(exc, pg))
        return AlreadyExists("the resource already exists", reason="ALREADY_EXISTS")
    if isinstance(getattr(exc, "orig", exc), pg.lock_not_available):
        # A unit's own lock_timeout (``_lock_timeout``): its callers gave up; the database has not failed.
        return DeadlineExceeded(
            "the call's deadline passed while waiting for a row lock", reason="DEADLINE_EXCEEDED"
        )
    if _is_unavailable(exc, pg):
        log.warning("database unavailable: %s", _describe(exc, pg))
        return Unavailable("the database is unavailable; retry later", reason="STORAGE_UNAVAILABLE")
    return None


class _PsycopgErrors(NamedTuple):
    """psycopg's exception classes that ``translate_error`` tells apart; empty while psycopg is not loaded."""

    integrity: tuple[type[BaseException], ...] = ()
    lock_not_available: tuple[type[BaseException], ...] = ()
    unavailable: tuple[type[BaseException], ...] = ()


def _psycopg() -> _PsycopgErrors:
    """psycopg's classes once something has loaded it, as a PostgreSQL engine does; none before that.

    psycopg is not imported here: an SQLite server or command never loads it (about a tenth of a command's
    time), and while it is not loaded, no exception of its classes can exist to be told apart.
    """
    module = sys.modules.get("psycopg")
    if module is None:
        return _PsycopgErrors()
    return _PsycopgErrors(
        integrity=(module.IntegrityError,),
        lock_not_available=(module.errors.LockNotAvailable,),
        unavailable=(module.OperationalError, module.InterfaceError),
    )


def _is_unavailable(exc: BaseException, pg: _PsycopgErrors) -> bool:
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(
        exc,
        (
            sa_exc.OperationalError,
            sa_exc.InterfaceError,
            sa_exc.DisconnectionError,
            sa_exc.TimeoutError,  # no pooled connection became free in time
            sqlite3.OperationalError,
            *pg.unavailable,
        ),
    )


def _describe(exc: BaseException, pg: _PsycopgErrors) -> str:
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None else exc
    if isinstance(orig, pg.integrity):
        # PostgreSQL's detail quotes the conflicting values (customer numbers, request ids): name the
        # constraint instead. SQLite's message already names only the columns.
        return f"{type(orig).__name__} on constraint {orig.diag.constraint_name}"  # type: ignore[attr-defined]
    return f"{type(orig).__name__}: {orig}"


def _nothing() -> None:
    return None


def _give_back(pooled: Any, connection: psycopg.Connection[Any]) -> None:
    """Return a unit's connection to the pool as the pool lent it (not in autocommit), or discard it."""
    import psycopg  # loaded already: the connection is one of its

    if not (connection.broken or connection.closed):
        try:
            connection.autocommit = False
        except psycopg.Error as exc:  # still in a transaction: a ROLLBACK that failed
            pooled.invalidate(exc)
    pooled.close()


def _rollback_quietly(rollback: Callable[[], object]) -> None:
    try:
        rollback()
    except Exception:
        # The original exception matters more; a dead connection often cannot roll back anyway.
        log.debug("rollback failed", exc_info=True)


def _ping_idle_connections(engine: Engine) -> None:
    """Test a pooled connection before use only when it has been idle a while, not on every checkout.

    A ping per checkout is a round trip per unit of work. A connection in steady use needs none: if the server
    restarted meanwhile, the first statement fails, the call answers UNAVAILABLE and SQLAlchemy discards
    every connection of the pool made before the failure. An idle one (a quiet night, a failover while
    nobody called) is pinged, and one that does not answer is replaced before anything runs on it.
    """

    def checkin(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    def checkout(dbapi_connection: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
        idle_since = record.info.get(_IDLE_SINCE)
        if idle_since is None or time.monotonic() - idle_since < _PING_AFTER_IDLE_S:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise sa_exc.DisconnectionError("an idle pooled connection did not answer") from exc
        if not alive:
            raise sa_exc.DisconnectionError("an idle pooled connection did not answer")

    event.listen(engine, "checkin", checkin)
    event.listen(engine, "checkout", checkout)


def _configure_sqlite(dbapi_connection: sqlite3.Connection, *, auto_checkpoint: bool) -> None:
    # Take transaction control away from the sqlite3 module, whose legacy mode issues BEGIN only before
    # DML: SELECTs would escape the transaction and DDL would auto-commit. _on_sqlite_begin issues BEGIN.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # Wait for a competing writer rather than failing at once with "database is locked"; first, because
        # switching to WAL itself needs the lock when several processes open a new file together.
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
        # WAL lets readers run while one writer commits.
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL syncs the WAL on every commit, so an answered request survives power loss.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        if not auto_checkpoint:
            # The WAL is moved into the database file by _Checkpoints instead: a commit that did it here
            # would wait for the copy and a sync of the database file (the p99 of a lone score: 2 ms).
            cursor.execute("PRAGMA wal_autocheckpoint=0")
    finally:
        cursor.close()


def _on_postgresql_begin(connection: Connection) -> None:
    deadline = current_deadline()
    # Reads wait for no row lock on PostgreSQL, so only write units pay the statement's round trip.
    if deadline is not None and not connection.get_execution_options().get(_READ_ONLY_OPTION):
        connection.exec_driver_sql(_lock_timeout(deadline))


def _on_sqlite_begin(connection: Connection) -> None:
    if connection.get_execution_options().get(_READ_ONLY_OPTION):
        connection.exec_driver_sql("BEGIN")
    else:
        # Taking the write lock up front serialises writers: a deferred transaction that read first
        # and then writes would instead fail with SQLITE_BUSY when another writer got in between.
        connection.exec_driver_sql("BEGIN IMMEDIATE")
