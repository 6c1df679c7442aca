"""Persistence for posguard: SQLAlchemy 2.x on SQLite or PostgreSQL, schema managed by Alembic.

Stores take a ``Database`` and return plain domain objects; ORM rows never leave this package. Import each
store from its own module (``posguard_server.store.api_keys``...): the package imports nothing itself, so
a command that needs one store loads one store, not all of them. What needs the whole schema at once
(Alembic's environment, backups, the schema tests) takes it from ``tables.METADATA``.
"""
