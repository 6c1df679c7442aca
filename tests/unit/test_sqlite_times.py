"""Times on SQLite: ``UTCDateTime`` writes and reads, in one function each, what SQLAlchemy's composition of
the type's own conversion and SQLite's DATETIME writes and reads; statements run through the driver use the
same text (``sqlite_time``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Column, Integer, MetaData, Table, TypeDecorator, create_engine, text
from sqlalchemy.dialects import sqlite

from posguard_server.store.schema import UTCDateTime, sqlite_time

_DIALECT = sqlite.dialect()
_TYPE = UTCDateTime().dialect_impl(_DIALECT)
_ZONES = st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-9, minutes=-30))])
# Away from the years 1 and 9999, where a zone's offset would leave datetime's range.
_TIMES = st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=_ZONES)


def _sqlalchemy_write(value: datetime | None) -> object:
    """What SQLAlchemy itself binds: the type's process_bind_param, then SQLite's DATETIME text."""
    process = TypeDecorator.bind_processor(_TYPE, _DIALECT)
    assert process is not None
    return process(value)


def _sqlalchemy_read(stored: str | None) -> object:
    process = TypeDecorator.result_processor(_TYPE, _DIALECT, None)
    assert process is not None
    return process(stored)


@given(_TIMES)
def test_a_time_is_written_and_read_as_sqlalchemy_writes_and_reads_it(value: datetime) -> None:
    write = _TYPE.bind_processor(_DIALECT)
    read = _TYPE.result_processor(_DIALECT, None)
    assert write is not None
    assert read is not None
    stored = write(value)
    assert stored == _sqlalchemy_write(value) == sqlite_time(value)
    assert read(stored) == _sqlalchemy_read(stored) == value
    assert read(stored).tzinfo is UTC


@pytest.mark.parametrize(
    "stored",
    ["2026-03-01 09:30:15", "2026-03-01 09:30:15.250000", "2026-03-01T09:30:15+02:00", "2026-03-01"],
)
def test_text_of_other_forms_is_read_as_sqlalchemy_reads_it(stored: str) -> None:
    read = _TYPE.result_processor(_DIALECT, None)
    assert read is not None
    assert read(stored) == _sqlalchemy_read(stored)
    assert read(stored).tzinfo is UTC


def test_none_stays_none_and_a_naive_time_is_refused_both_ways() -> None:
    write = _TYPE.bind_processor(_DIALECT)
    read = _TYPE.result_processor(_DIALECT, None)
    assert write is not None
    assert read is not None
    assert write(None) is None
    assert _sqlalchemy_write(None) is None
    assert read(None) is None
    naive = datetime(2026, 3, 1, 9, 30)
    for convert in (write, _sqlalchemy_write, sqlite_time):
        with pytest.raises(ValueError, match="timezone-aware"):
            convert(naive)


@pytest.mark.parametrize(
    "at",
    [
        datetime(2026, 3, 1, 9, 30, 15, 250_000, tzinfo=UTC),
        datetime(2026, 3, 1, 9, 30, 15, tzinfo=timezone(timedelta(hours=2))),  # stored as UTC, no offset
        datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    ],
)
def test_a_time_stored_through_sqlalchemy_is_the_text_of_its_composition(at: datetime) -> None:
    # The same text, so the column sorts and compares alike whichever way a row was written.
    engine = create_engine("sqlite://")
    metadata = MetaData()
    table = Table("times", metadata, Column("id", Integer, primary_key=True), Column("at", UTCDateTime))
    metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(table.insert(), {"id": 1, "at": at})
        stored = connection.execute(text("SELECT at FROM times")).scalar_one()
        assert connection.execute(table.select()).one().at == at
    assert stored == _sqlalchemy_write(at)
