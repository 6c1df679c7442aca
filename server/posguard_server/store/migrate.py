"""Schema migrations, driven from code: Alembic's scripts ship inside the package, no ini file is read.

``upgrade`` is what the command-line database upgrade runs; ``is_current`` lets the server refuse to start
on a schema that is behind (or ahead of) the code.
"""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from posguard_server.store.db import Database, translate_error

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy import Connection, Engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# An arbitrary constant naming posguard's migration lock among other PostgreSQL advisory locks.
_MIGRATION_LOCK_ID = 0x706F73677561  # "posgua"


def alembic_config(connection: Connection | None = None, *, url: str | None = None) -> Config:
    """An Alembic configuration for our scripts; migrations run on ``connection`` when one is given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # The option goes through configparser interpolation, where "%" (URL escapes) is special.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


class SchemaNotCurrentError(RuntimeError):
    """The database schema is older than this release; an operator must run ``db upgrade``."""


def open_database(url: str, *, background_checkpoints: bool = False) -> Database:
    """Open the database; bring the embedded SQLite schema up to date, insist on it for a shared database.

    Migrating a shared PostgreSQL from whichever replica starts first would race; operators run
    ``posguard-server db upgrade`` once per release instead. ``background_checkpoints``: see ``Database``.
    """
    database = Database(url, background_checkpoints=background_checkpoints)
    if database.dialect == "sqlite":
        upgrade(url)
    elif not is_current(url):
        database.dispose()
        raise SchemaNotCurrentError("the database schema is not current: run `posguard-server db upgrade`")
    return database


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` to ``revision``; already being there is a no-op."""
    database = Database(url)
    try:
        with _translated(), _sqlite_migration_lock(database):
            # A schema at head is the common case (every start and command after the first). Alembic's
            # upgrade would load the environment, and with it every store's tables: 0.2 s for nothing.
            if revision == "head" and current_revision(database.engine) == head_revision():
                return
            with migration_connection(database) as connection:
                command.upgrade(alembic_config(connection), revision)
    finally:
        database.dispose()


@contextmanager
def _sqlite_migration_lock(database: Database) -> Iterator[None]:
    """Serialise migrations of one SQLite file across threads and processes.

    PostgreSQL has an advisory lock for this. SQLite's own locking is not enough: a process that opens a
    new file while another converts it to WAL can get "database is locked" without waiting.
    """
    if database.dialect != "sqlite" or database.engine.url.database is None:
        yield
        return
    lock_path = Path(database.engine.url.database).with_suffix(".migrate.lock")
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def migration_connection(database: Database) -> Iterator[Connection]:
    """A connection inside one transaction, prepared for schema changes; commits when the block succeeds.

    One transaction around all steps means a failed migration leaves the schema as it was, on SQLite too
    (the engine issues a real BEGIN there, which makes its DDL transactional).
    """
    sqlite = database.dialect == "sqlite"
    with database.engine.connect() as connection:
        if sqlite:
            # Batch mode rebuilds a table by copying it and dropping the original; with enforcement on,
            # dropping a referenced table would fire ON DELETE actions on its children. The pragma is
            # ignored inside a transaction, so it is set before BEGIN and integrity checked before COMMIT.
            _sqlite_pragma(connection, "foreign_keys=OFF")
        try:
            with connection.begin():
                if database.dialect == "postgresql":
                    # Replicas starting together queue here; the later ones then find the schema at head.
                    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_ID})")
                yield connection
                if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                    raise RuntimeError("the migration left rows that violate foreign keys; rolled back")
        finally:
            if sqlite:
                _sqlite_pragma(connection, "foreign_keys=ON")


def _sqlite_pragma(connection: Connection, pragma: str) -> None:
    # Straight to the driver: through SQLAlchemy the statement would first open a transaction.
    cursor = connection.connection.cursor()
    try:
        cursor.execute(f"PRAGMA {pragma}")
    finally:
        cursor.close()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None when it has never been migrated."""
    with _translated(), engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """The newest revision this code knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError("no migration scripts found")
    return head


def is_current(url: str) -> bool:
    """Whether the database at ``url`` is exactly at the head revision."""
    database = Database(url)
    try:
        return current_revision(database.engine) == head_revision()
    finally:
        database.dispose()


@contextmanager
def _translated() -> Iterator[None]:
    """Report an unreachable database as ``Unavailable``, as the session scope does."""
    try:
        yield
    except Exception as exc:
        translated = translate_error(exc)
        if translated is None:
            raise
        raise translated from exc
