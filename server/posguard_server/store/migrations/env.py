"""Alembic environment for posguard's schema.

Normally run through ``posguard_server.store.migrate``, which hands over an open connection. Given only a
``sqlalchemy.url`` option it connects by itself, and offline (``--sql``) it renders the SQL instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from alembic import context
from sqlalchemy.engine import make_url

from posguard_server.store.db import Database, normalize_url
from posguard_server.store.migrate import migration_connection
from posguard_server.store.tables import METADATA

if TYPE_CHECKING:
    from sqlalchemy import Connection

config = context.config
target_metadata = METADATA


def _options(dialect_name: str) -> dict[str, Any]:
    return {
        "target_metadata": target_metadata,
        # Autogenerate should notice a changed type or length, not just new and dropped columns.
        "compare_type": True,
        # SQLite's ALTER TABLE cannot change or drop most things; batch mode copies the table instead.
        "render_as_batch": dialect_name == "sqlite",
    }


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database: pass a connection or set the sqlalchemy.url option")
    return normalize_url(url)


def _run_on(connection: Connection) -> None:
    context.configure(connection=connection, **_options(connection.dialect.name))
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    url = _url()
    context.configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **_options(make_url(url).get_backend_name()),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    database = Database(_url())
    try:
        with migration_connection(database) as own_connection:
            _run_on(own_connection)
    finally:
        database.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
