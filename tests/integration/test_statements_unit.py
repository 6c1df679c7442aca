"""``Database.statements_unit``: one transaction, whether its statements are sent alone or together, and a
pooled connection given back as it was lent (on PostgreSQL the unit runs it in autocommit, sending its own
BEGIN with its first statements)."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import Column, MetaData, String, Table, func, insert, select

from posguard_server.store.db import Database

_ROWS = Table("unit_rows", MetaData(), Column("name", String(16), primary_key=True))


class _Refused(Exception):
    pass


def _names(database: Database) -> list[str]:
    with database.engine.connect() as connection:
        return list(connection.scalars(select(_ROWS.c.name).order_by(_ROWS.c.name)))


def _fail_after_writing(database: Database, name: str) -> None:
    with database.statements_unit() as unit:
        with unit.together():
            unit.execute(insert(_ROWS), [{"name": name}])
        raise _Refused


def _fail_in_a_session(database: Database) -> None:
    with database.session() as session:
        session.execute(insert(_ROWS).values(name="session"))
        raise _Refused


def test_a_unit_commits_all_its_statements_or_none(database: Database) -> None:
    _ROWS.create(database.engine)
    with database.statements_unit() as unit:
        unit.execute(insert(_ROWS), [{"name": "alone"}])
        with unit.together():
            unit.execute(insert(_ROWS), [{"name": "together-1"}, {"name": "together-2"}])
            counted = unit.execute(select(func.count()).select_from(_ROWS))
        assert counted.one()[0] == 3  # the unit sees its own writes
    with pytest.raises(_Refused):
        _fail_after_writing(database, "rolled-back")
    assert _names(database) == ["alone", "together-1", "together-2"]


def test_after_a_unit_a_session_on_the_same_pool_still_rolls_back(database: Database) -> None:
    # A connection given back in autocommit would keep what a later session wrote and rolled back.
    database.dispose()
    _ROWS.create(database.engine)
    with database.statements_unit() as unit:
        unit.execute(insert(_ROWS), [{"name": "kept"}])
    with pytest.raises(_Refused):
        _fail_after_writing(database, "unit")
    with pytest.raises(_Refused):
        _fail_in_a_session(database)
    if database.dialect == "postgresql":
        assert database.engine.pool.checkedin() == 1  # type: ignore[attr-defined]  # every step used it
    assert _names(database) == ["kept"]


def test_a_read_only_unit_reads_what_is_committed_beside_a_write_unit_and_writes_nothing(
    database: Database,
) -> None:
    _ROWS.create(database.engine)
    with database.statements_unit() as unit:
        unit.execute(insert(_ROWS), [{"name": "committed"}])
    with database.statements_unit() as writer:
        writer.execute(insert(_ROWS), [{"name": "uncommitted"}])
        # On SQLite the writer holds the write lock: a unit that asked for it too would wait for it and fail
        # at the busy timeout.
        with database.statements_unit(read_only=True) as reader:
            assert [row.name for row in reader.execute(select(_ROWS.c.name))] == ["committed"]
    if database.dialect == "postgresql":
        # A read-only transaction: a write in it is refused by the database.
        with (
            pytest.raises(psycopg.errors.ReadOnlySqlTransaction),
            database.statements_unit(read_only=True) as reader,
        ):
            reader.execute(insert(_ROWS), [{"name": "refused"}])
    assert _names(database) == ["committed", "uncommitted"]
