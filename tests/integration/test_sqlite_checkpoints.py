"""The server's SQLite database moves its WAL into the database file in the background, not in a commit."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import text

from posguard_server.store.db import Database
from posguard_server.store.migrate import open_database

_ROWS = 3000  # about 1,500 pages of WAL: past SQLite's own checkpoint at 1,000


def _fill(database: Database) -> None:
    with database.session() as session:
        session.execute(text("CREATE TABLE filler (id INTEGER PRIMARY KEY, body TEXT NOT NULL)"))
    for start in range(0, _ROWS, 100):
        with database.sqlite_unit() as connection:
            connection.executemany(
                "INSERT INTO filler (id, body) VALUES (?, ?)",
                [(n, "x" * 2000) for n in range(start, start + 100)],
            )


def _autocheckpoint(database: Database) -> tuple[int, int]:
    """``wal_autocheckpoint`` of a pooled connection and of a driver unit's connection."""
    with database.session(read_only=True) as session:
        pooled = session.execute(text("PRAGMA wal_autocheckpoint")).scalar_one()
    with database.sqlite_unit() as connection:
        (driver,) = connection.execute("PRAGMA wal_autocheckpoint").fetchone()
    return int(pooled), int(driver)


def test_the_servers_commits_never_checkpoint_and_a_thread_moves_the_wal(tmp_path: Path) -> None:
    path = tmp_path / "server.db"
    database = open_database(f"sqlite:///{path}", background_checkpoints=True)
    try:
        assert _autocheckpoint(database) == (0, 0)
        before = path.stat().st_size
        _fill(database)
        # The rows reach the database file itself within a few of the thread's rounds (every 0.25 s).
        deadline = time.monotonic() + 10
        while path.stat().st_size < before + _ROWS * 2000 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert path.stat().st_size >= before + _ROWS * 2000
    finally:
        database.dispose()


def test_other_processes_keep_sqlites_own_checkpoints(tmp_path: Path) -> None:
    # A command-line import has no thread of its own to do it: its commits checkpoint as SQLite does.
    database = open_database(f"sqlite:///{tmp_path / 'tool.db'}")
    try:
        assert _autocheckpoint(database) == (1000, 1000)
    finally:
        database.dispose()


def test_without_the_thread_the_wal_would_keep_the_rows(tmp_path: Path) -> None:
    # The check above can fail: with checkpoints off and no thread, the database file does not grow.
    path = tmp_path / "off.db"
    database = open_database(f"sqlite:///{path}", background_checkpoints=True)
    try:
        checkpoints = database._checkpoints
        assert checkpoints is not None
        # The thread ends after one last round, before the rows are written; the handle still leaves
        # checkpoints to it, so its connections do none either.
        checkpoints.stop()
        before = path.stat().st_size
        _fill(database)
        time.sleep(0.6)
        assert path.stat().st_size < before + _ROWS * 2000
        assert (tmp_path / "off.db-wal").stat().st_size >= _ROWS * 2000
    finally:
        database.dispose()
