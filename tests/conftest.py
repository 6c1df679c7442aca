"""Fixtures shared by all tests: a database on every supported backend."""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy.engine import make_url

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
    from collections.abc import Callable, Iterator

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


@pytest.fixture
def empty_database(request: pytest.FixtureRequest) -> bool:
    """Whether the test is marked ``empty_database``: its databases start empty, as on a first start."""
    return request.node.get_closest_marker("empty_database") is not None


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedded database migrated once per test process, for the tests that need a migrated one.

    Migrating an empty file takes about 0.4 s, copying this one a millisecond; an upgrade of the copy (by
    the test, or by the server it starts) then finds the schema at head and changes nothing.
    """
    path = tmp_path_factory.mktemp("template") / "posguard.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def migrated_sqlite_file(sqlite_template: Path) -> Callable[[Path], None]:
    """Makes a copy of ``sqlite_template`` at a path: a new file, owner-only as the server makes its own."""

    def copy_to(target: Path) -> None:
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        with closing(sqlite3.connect(sqlite_template)) as source, closing(sqlite3.connect(target)) as copy:
            source.backup(copy)

    return copy_to


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[str]:
    """The name of a PostgreSQL database migrated once per test process, which tests' databases copy.

    Creating and migrating an empty database took about 1.3 s a test; a copy of this one about 0.5 s.
    """
    with scratch_postgres_database(_postgresql_server_url(), "posguard_template") as url:
        upgrade(url)
        name = make_url(url).database
        assert name is not None
        yield name


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
    ids=["sqlite", "postgresql"],
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path, empty_database: bool) -> Iterator[str]:
    """The URL of a database of its own for this test, on each backend: migrated to the head revision, or
    empty for a test marked ``empty_database``."""
    if request.param == "sqlite":
        path = tmp_path / "posguard.db"
        if not empty_database:
            request.getfixturevalue("migrated_sqlite_file")(path)
        yield f"sqlite:///{path}"
        return

    template = None if empty_database else request.getfixturevalue("postgres_template")
    with scratch_postgres_database(_postgresql_server_url(), "posguard_t", template=template) as url:
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
