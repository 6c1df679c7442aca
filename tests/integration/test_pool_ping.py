"""PostgreSQL connections are pinged before use only after sitting idle, and a dead one is replaced."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from posguard_server.domain.errors import Unavailable
from posguard_server.store import db
from posguard_server.store.db import Database


def _backend_pid(database: Database) -> int:
    with database.session(read_only=True) as session:
        return int(session.scalar(text("SELECT pg_backend_pid()")) or 0)


def _terminate(database: Database, pid: int) -> None:
    other = Database(database.engine.url.render_as_string(hide_password=False))
    try:
        with other.session() as session:
            assert session.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        other.dispose()


@pytest.fixture
def postgresql(database: Database) -> Database:
    if database.dialect != "postgresql":
        pytest.skip("the pool ping is PostgreSQL's; SQLite has no connection to lose")
    return database


def test_an_idle_connection_that_died_is_replaced_before_use(
    postgresql: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = _backend_pid(postgresql)
    _terminate(postgresql, pid)
    monkeypatch.setattr(db, "_PING_AFTER_IDLE_S", 0.0)  # every pooled connection counts as idle

    assert _backend_pid(postgresql) != pid  # answered on a new connection, no error


def test_a_connection_in_steady_use_is_not_pinged_and_a_failure_discards_the_pool(
    postgresql: Database,
) -> None:
    pings: list[int] = []
    original = postgresql.engine.dialect.do_ping

    def counting_ping(dbapi_connection: object) -> bool:
        pings.append(1)
        return original(dbapi_connection)

    postgresql.engine.dialect.do_ping = counting_ping  # type: ignore[method-assign]
    pid = _backend_pid(postgresql)
    for _ in range(5):
        assert _backend_pid(postgresql) == pid
    assert pings == []  # no round trip added to each unit of work

    _terminate(postgresql, pid)
    with pytest.raises(Unavailable):
        _backend_pid(postgresql)
    assert _backend_pid(postgresql) != pid  # the next call reconnects
