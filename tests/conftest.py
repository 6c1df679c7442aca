"""Fixtures shared by all tests: a database on every supported backend."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from posguard_server.store.db import Database, normalize_url
from posguard_server.store.history import SqlHistoryStore
from posguard_server.store.migrate import upgrade
from posguard_server.store.model_registry import SqlModelRegistry
from posguard_server.store.outcomes import SqlOutcomeStore
from posguard_server.store.profiles import SqlProfileStore
from posguard_server.store.scoring_writes import SqlScoringStore
from posguard_server.store.scratch import scratch_postgres_database
from posguard_server.store.shadow import SqlShadowStore

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

_PG_URL_ENV = "POSGUARD_TEST_DATABASE_URL"
# Every server a test starts, in this process or in a child, serves its console on a free port: the default
# 127.0.0.1:8080 would be shared by tests running at once (tests that check the setting set it themselves).
os.environ.setdefault("POSGUARD_CONSOLE_LISTEN", "127.0.0.1:0")


def _postgresql_server_url() -> str:
    url = os.environ.get(_PG_URL_ENV)
    if not url:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL tests must run in CI: set {_PG_URL_ENV}")
        pytest.skip(f"{_PG_URL_ENV} is not set")
    return normalize_url(url)


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
    ids=["sqlite", "postgresql"],
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database of its own for this test, on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/posguard.db"
        return

    with scratch_postgres_database(_postgresql_server_url(), "posguard_t") as url:
        yield url


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    """A migrated database, disposed after the test."""
    upgrade(database_url)
    db = Database(database_url)
    try:
        yield db
    finally:
        db.dispose()


@dataclass(frozen=True, slots=True)
class RiskStores:
    """The risk stores on one database, for the store tests that use several of them."""

    scoring: SqlScoringStore
    history: SqlHistoryStore
    profiles: SqlProfileStore
    outcomes: SqlOutcomeStore
    registry: SqlModelRegistry
    shadow: SqlShadowStore


@pytest.fixture
def risk_stores(database: Database) -> RiskStores:
    return RiskStores(
        scoring=SqlScoringStore(database),
        history=SqlHistoryStore(database),
        profiles=SqlProfileStore(database),
        outcomes=SqlOutcomeStore(database),
        registry=SqlModelRegistry(database),
        shadow=SqlShadowStore(database),
    )
