"""The one way a command opens the database: migrated as a server does, errors as one line, always closed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import click

from posguard_server.config import Settings

if TYPE_CHECKING:
    from posguard_server.domain.errors import PosguardError
    from posguard_server.store.db import Database
    from posguard_server.store.history import SqlHistoryStore
    from posguard_server.store.model_registry import SqlModelRegistry
    from posguard_server.store.shadow import SqlShadowStore

T = TypeVar("T")


def refusal(error: PosguardError) -> click.ClickException:
    """A store's refusal as the one line on stderr a command leaves with (exit status 1)."""
    from posguard_server.domain.errors import InvalidArgument

    if isinstance(error, InvalidArgument):
        return click.ClickException("; ".join(f"{v.field} {v.description}" for v in error.violations))
    return click.ClickException(f"refused ({error.reason}): {error.message}")


@contextmanager
def store_errors() -> Iterator[None]:
    """Refusals and an unreachable database leave as one line on stderr and exit status 1, not a traceback."""
    from posguard_server.domain.errors import PosguardError

    try:
        yield
    except PosguardError as error:
        raise refusal(error) from None


@contextmanager
def opened(settings: Settings, make: Callable[[Database], T]) -> Iterator[T]:
    """``make(database)`` on the configured database, which is disposed of when the block ends.

    The embedded SQLite schema is brought up to date first; a shared database must already be current.
    """
    from posguard_server.store.migrate import SchemaNotCurrentError, open_database

    with store_errors():
        try:
            database = open_database(settings.effective_database_url)
        except SchemaNotCurrentError as error:
            raise click.ClickException(str(error)) from None
        try:
            yield make(database)
        finally:
            database.dispose()


@dataclass(frozen=True, slots=True)
class RiskStores:
    """What ``models``, ``train``, ``retrain`` and ``report`` work on: history, registry and shadow run."""

    history: SqlHistoryStore
    registry: SqlModelRegistry
    shadow: SqlShadowStore


def risk_stores(database: Database) -> RiskStores:
    from posguard_server.store.history import SqlHistoryStore
    from posguard_server.store.model_registry import SqlModelRegistry
    from posguard_server.store.shadow import SqlShadowStore

    return RiskStores(SqlHistoryStore(database), SqlModelRegistry(database), SqlShadowStore(database))
