"""Core statements run through the driver itself (sqlite3, psycopg) write and read exactly what a Core
execution does, on SQLite and on PostgreSQL."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import (
    Boolean,
    Column,
    Double,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    insert,
    literal_column,
    select,
    union_all,
    update,
)

from posguard_server.store.driver import POSTGRESQL, DriverConnection
from posguard_server.store.schema import UTCDateTime

_METADATA = MetaData()
_ROWS = Table(
    "rows",
    _METADATA,
    Column("name", String(16), primary_key=True),
    Column("at", UTCDateTime, nullable=True),
    Column("flag", Boolean, nullable=False),
    Column("blob", LargeBinary, nullable=True),
    Column("score", Double, nullable=True),
    Column("note", Text, nullable=True),
    Column("version", Integer, nullable=False, default=0),
)
_BY_NAMES = select(_ROWS).where(_ROWS.c.name.in_(bindparam("names", expanding=True))).order_by(_ROWS.c.name)
_NOT_NAMES = select(_ROWS.c.name).where(_ROWS.c.name.not_in(bindparam("names", expanding=True)))
_FLAGGED_NOTES = select(_ROWS.c.name).where(_ROWS.c.note.in_(["a", "b"]))  # a list bound by the statement
_BUMP = (
    update(_ROWS)
    .where(_ROWS.c.name == bindparam("b_name"), _ROWS.c.version == bindparam("b_version"))
    .values(score=bindparam("score"), version=_ROWS.c.version + 1)
)
_BOTH_HALVES = union_all(
    select(_ROWS.c.name, literal_column("'x'").label("kind")).where(
        _ROWS.c.name.in_(bindparam("first", expanding=True))
    ),
    select(_ROWS.c.name, literal_column("'y'").label("kind")).where(
        _ROWS.c.name.in_(bindparam("second", expanding=True))
    ),
)

_VALUES = [
    {
        "name": "a",
        "at": datetime(2026, 3, 1, 9, 30, 15, 250_000, tzinfo=UTC),
        "flag": True,
        "blob": b"\x00\x01",
        "score": 0.25,
        "note": "a",
        "version": 0,
    },
    {
        "name": "b",
        # Another offset, and no microseconds: stored as UTC text with them, as SQLAlchemy stores it.
        "at": datetime(2026, 3, 1, 9, 30, 15, tzinfo=timezone(timedelta(hours=2))),
        "flag": False,
        "blob": None,
        "score": None,
        "note": None,
        "version": 0,
    },
    {"name": "c", "at": None, "flag": True, "blob": b"", "score": -1.5, "note": "b", "version": 0},
]


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url)
    _METADATA.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def driver(engine: Engine) -> Iterator[DriverConnection]:
    connection: Any
    if engine.dialect.name == "sqlite":
        connection = sqlite3.connect(str(engine.url.database), isolation_level=None)
        yield DriverConnection(connection)
    else:
        # Each statement commits on its own, as sqlite3's do without isolation_level.
        url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        connection = psycopg.connect(url, autocommit=True)
        yield DriverConnection(connection, POSTGRESQL)
    connection.close()


@pytest.fixture
def filled_postgresql(engine: Engine) -> Iterator[psycopg.Connection[Any]]:
    """A psycopg connection (autocommit) to a PostgreSQL table holding ``_VALUES``; skipped on SQLite."""
    if engine.dialect.name == "sqlite":
        pytest.skip("sqlite3 has no round trips to save")
    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    raw = psycopg.connect(url, autocommit=True)
    DriverConnection(raw, POSTGRESQL).execute(insert(_ROWS), _VALUES)
    yield raw
    raw.close()


def _core_rows(engine: Engine) -> list[tuple[object, ...]]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(select(_ROWS).order_by(_ROWS.c.name))]


def test_rows_written_through_the_driver_read_back_alike_through_core(
    engine: Engine, driver: DriverConnection
) -> None:
    driver.execute(insert(_ROWS), _VALUES)
    with engine.begin() as connection:
        # The same rows written by Core into a second table of the same shape give the same stored text.
        connection.exec_driver_sql("CREATE TABLE core_rows AS SELECT * FROM rows WHERE 1 = 0")
    core = Table("core_rows", MetaData(), *(Column(c.name, c.type) for c in _ROWS.c))
    with engine.begin() as connection:
        connection.execute(insert(core), _VALUES)
        stored_by_driver = connection.exec_driver_sql("SELECT * FROM rows ORDER BY name").all()
        stored_by_core = connection.exec_driver_sql("SELECT * FROM core_rows ORDER BY name").all()
    assert stored_by_driver == stored_by_core
    read_by_driver = [tuple(row) for row in driver.execute(_BY_NAMES, {"names": ["a", "b", "c"]})]
    assert read_by_driver == _core_rows(engine)
    first = driver.execute(_BY_NAMES, {"names": ["a"]}).one()
    assert first.at == datetime(2026, 3, 1, 9, 30, 15, 250_000, tzinfo=UTC)  # aware, UTC
    assert first.flag is True
    assert first.blob == b"\x00\x01"


def test_lists_padded_empty_or_bound_by_the_statement_select_what_core_selects(
    engine: Engine, driver: DriverConnection
) -> None:
    driver.execute(insert(_ROWS), _VALUES)
    # Three names are sent as four (the last repeated): the same rows, each once.
    assert [row.name for row in driver.execute(_BY_NAMES, {"names": ["c", "a", "b"]})] == ["a", "b", "c"]
    assert list(driver.execute(_BY_NAMES, {"names": []})) == []
    assert sorted(row.name for row in driver.execute(_NOT_NAMES, {"names": []})) == ["a", "b", "c"]
    assert sorted(row.name for row in driver.execute(_NOT_NAMES, {"names": ["a", "b", "b"]})) == ["c"]
    assert sorted(row.name for row in driver.execute(_FLAGGED_NOTES)) == ["a", "c"]
    halves = driver.execute(_BOTH_HALVES, {"first": ["a"], "second": ["b", "c"]})
    assert sorted((row.name, row.kind) for row in halves) == [("a", "x"), ("b", "y"), ("c", "y")]


def test_an_update_of_many_counts_the_rows_it_changed_and_binds_its_own_values(
    engine: Engine, driver: DriverConnection
) -> None:
    driver.execute(insert(_ROWS), _VALUES)
    moved = driver.execute(
        _BUMP,
        [
            {"b_name": "a", "b_version": 0, "score": 1.0},
            {"b_name": "b", "b_version": 7, "score": 2.0},  # another version: changes nothing
            {"b_name": "c", "b_version": 0, "score": 3.0},
        ],
    )
    assert moved.rowcount == 2
    assert [(row[0], row[4], row[6]) for row in _core_rows(engine)] == [
        ("a", 1.0, 1),
        ("b", None, 0),
        ("c", 3.0, 1),
    ]


def test_a_defaulted_column_must_be_given(driver: DriverConnection) -> None:
    # A Python-side default would be computed per row by Core; the driver path refuses rather than skip it.
    row = {key: value for key, value in _VALUES[0].items() if key != "version"}
    with pytest.raises(TypeError, match="defaulted column"):
        driver.execute(insert(_ROWS), [row])


def test_statements_sent_together_are_answered_after_the_block_each_with_its_own_result(
    engine: Engine, driver: DriverConnection
) -> None:
    driver.execute(insert(_ROWS), _VALUES)
    with driver.together():
        first = driver.execute(_BY_NAMES, {"names": ["a"]})
        both = driver.execute(_BY_NAMES, {"names": ["b", "c"]})
        moved = driver.execute(
            _BUMP,
            [{"b_name": "a", "b_version": 0, "score": 1.0}, {"b_name": "c", "b_version": 9, "score": 3.0}],
        )
        after = driver.execute(_BY_NAMES, {"names": ["a"]})  # sent after the update: sees it
    assert first.one().score == 0.25
    assert [row.name for row in both] == ["b", "c"]
    assert moved.rowcount == 1
    assert after.one().score == 1.0
    # A value read inside the block is right too (what was queued is sent first), and the block goes on.
    with driver.together():
        counted = driver.execute(_BUMP, {"b_name": "b", "b_version": 0, "score": 2.0})
        assert counted.rowcount == 1
        read = driver.execute(_BY_NAMES, {"names": ["b"]})
        assert read.one().version == 1
    assert [(row[0], row[4], row[6]) for row in _core_rows(engine)] == [
        ("a", 1.0, 1),
        ("b", 2.0, 1),
        ("c", -1.5, 0),
    ]


def test_on_postgresql_a_block_is_sent_in_pipeline_mode_and_its_results_read_after_it(
    filled_postgresql: psycopg.Connection[Any],
) -> None:
    raw = filled_postgresql
    driver = DriverConnection(raw, POSTGRESQL)
    assert raw.pgconn.pipeline_status == psycopg.pq.PipelineStatus.OFF
    with driver.together():
        # Queued, not sent one by one: psycopg's pipeline mode holds the block's statements.
        assert raw.pgconn.pipeline_status == psycopg.pq.PipelineStatus.ON
        first = driver.execute(_BY_NAMES, {"names": ["a"]})
        rest = driver.execute(_BY_NAMES, {"names": ["b", "c"]})
    assert raw.pgconn.pipeline_status == psycopg.pq.PipelineStatus.OFF
    assert first.one().name == "a"
    assert [row.name for row in rest] == ["b", "c"]


def _round_trips(trace: str) -> int:
    """What libpq's trace shows the client waited for: a Sync ends a block (or an extended-protocol
    statement), a Query is a simple-protocol statement."""
    sent = [line.split("\t") for line in trace.splitlines() if line.startswith("F\t")]
    return sum(fields[2].startswith(("Sync", "Query")) for fields in sent)


def test_on_postgresql_a_units_first_statement_takes_its_begin_along_in_one_round_trip(
    filled_postgresql: psycopg.Connection[Any], tmp_path: Path
) -> None:
    raw = filled_postgresql
    unit = DriverConnection(raw, POSTGRESQL, begin=("BEGIN", "SET LOCAL lock_timeout = 5000"))
    trace = tmp_path / "libpq.trace"
    with trace.open("w") as out:
        raw.pgconn.trace(out.fileno())
        raw.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS | psycopg.pq.Trace.REGRESS_MODE)
        read = unit.execute(_BY_NAMES, {"names": ["a"]})  # outside a block
        assert read.one().name == "a"
        # In the unit's transaction, with its setting.
        assert raw.execute("SHOW lock_timeout").fetchone() == ("5s",)
        unit.end("COMMIT")
        raw.pgconn.untrace()
    # BEGIN, the setting and the read in one; SHOW; COMMIT.
    assert _round_trips(trace.read_text()) == 3
    assert raw.execute("SHOW lock_timeout").fetchone() == ("0",)  # SET LOCAL ended with the unit


def test_a_statement_that_fails_in_a_block_raises_where_the_block_ends_and_the_rest_is_not_kept(
    engine: Engine, database_url: str
) -> None:
    # In a transaction, as the units run them: the failure rolls back what the block sent before it.
    if engine.dialect.name == "sqlite":
        raw: Any = sqlite3.connect(str(engine.url.database), isolation_level=None)
        raw.execute("BEGIN")
        failure: type[Exception] = sqlite3.IntegrityError
        driver = DriverConnection(raw)
    else:
        raw = psycopg.connect(engine.url.set(drivername="postgresql").render_as_string(hide_password=False))
        failure = psycopg.IntegrityError
        driver = DriverConnection(raw, POSTGRESQL)
    try:
        driver.execute(insert(_ROWS), _VALUES[:1])
        raw.commit()
        if engine.dialect.name == "sqlite":
            raw.execute("BEGIN")
        with pytest.raises(failure):
            _send_together(driver, [_VALUES[1], _VALUES[0], _VALUES[2]])  # "a" again: a unique violation
        raw.rollback()
    finally:
        raw.close()
    assert [row[0] for row in _core_rows(engine)] == ["a"]


def _send_together(driver: DriverConnection, rows: list[dict[str, Any]]) -> None:
    with driver.together():
        for row in rows:
            driver.execute(insert(_ROWS), [row])
