"""Times written through the sqlite3 driver directly are the text SQLAlchemy writes for ``UTCDateTime``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, text

from posguard_server.store.schema import UTCDateTime, sqlite_time


@pytest.mark.parametrize(
    "at",
    [
        datetime(2026, 3, 1, 9, 30, 15, 250_000, tzinfo=UTC),
        datetime(2026, 3, 1, 9, 30, 15, tzinfo=timezone(timedelta(hours=2))),  # stored as UTC, no offset
        datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    ],
)
def test_a_time_is_the_text_sqlalchemy_stores(at: datetime) -> None:
    # The same text, so the column sorts and compares alike whichever way a row was written.
    engine = create_engine("sqlite://")
    metadata = MetaData()
    table = Table("times", metadata, Column("id", Integer, primary_key=True), Column("at", UTCDateTime))
    metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(table.insert(), {"id": 1, "at": at})
        stored = connection.execute(text("SELECT at FROM times")).scalar_one()
    assert sqlite_time(at) == stored
