"""Every table of posguard's schema in one metadata, for what needs all of them at once.

Tables are defined beside the stores that use them, and ``schema.Base.metadata`` holds those of the modules
imported so far. Alembic's environment, backups and the schema tests need every table: they take
``METADATA`` from here. A test checks that this list names every module that defines a table.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import MetaData

from posguard_server.store import (  # noqa: F401 (imported for the tables they define)
    audit,
    caller_limits,
    cases,
    customers,
    dynamic_codes,
    idempotency,
    policy,
    risk_tables,
    watch,
    write_probe,
)
from posguard_server.store.schema import Base

METADATA: Final[MetaData] = Base.metadata
