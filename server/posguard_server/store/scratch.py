"""A throw-away PostgreSQL database, for tests and benchmarks that need one of their own."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from posguard_server.store.db import normalize_url


@contextmanager
def scratch_postgres_database(server_url: str, prefix: str, *, template: str | None = None) -> Iterator[str]:
    """The URL of a new database on the server at ``server_url``; dropped (forcibly) afterwards.

    Empty, or a copy of the database named ``template`` (which nobody may be connected to meanwhile).
    """
    url = make_url(normalize_url(server_url))
    name = f"{prefix}_{secrets.token_hex(6)}"
    # CREATE/DROP DATABASE refuse to run inside a transaction.
    admin = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as connection:
            copied = f' TEMPLATE "{template}"' if template is not None else ""
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"{copied}')
        try:
            yield url.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()
