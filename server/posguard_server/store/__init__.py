"""Persistence for posguard: SQLAlchemy 2.x on SQLite or PostgreSQL, schema managed by Alembic.

Stores take a ``Database`` and return plain domain objects; ORM rows never leave this package.
"""

from posguard_server.store.api_keys import SqlApiKeyStore
from posguard_server.store.db import Database

__all__ = ["Database", "SqlApiKeyStore"]
