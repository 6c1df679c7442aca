"""What posguard sets on its PostgreSQL connections, and that a URL's own settings win."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from posguard_server.store.db import Database


@pytest.fixture
def postgresql_url(database_url: str) -> str:
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's connection settings")
    return database_url


def _setting(database: Database, name: str) -> str:
    try:
        with database.session(read_only=True) as session:
            return str(session.scalar(text(f"SHOW {name}")))
    finally:
        database.dispose()


def test_statements_are_planned_with_their_parameters_unless_the_url_says_otherwise(
    postgresql_url: str,
) -> None:
    # A generic plan made while a table was small would stay a sequential scan as the table grows.
    assert _setting(Database(postgresql_url), "plan_cache_mode") == "force_custom_plan"
    assert _setting(Database(postgresql_url), "application_name") == "posguard"
    own = f"{postgresql_url}?options=-cplan_cache_mode%3Dauto"
    assert _setting(Database(own), "plan_cache_mode") == "auto"
