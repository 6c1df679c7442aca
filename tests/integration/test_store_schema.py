"""The schema Alembic builds is exactly the one the ORM classes describe, on every backend."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from posguard_server.domain.risk import ModelScope
from posguard_server.store.db import Database
from posguard_server.store.migrate import (
    current_revision,
    head_revision,
    is_current,
    migration_connection,
    upgrade,
)
from posguard_server.store.model_registry import SqlModelRegistry
from posguard_server.store.tables import METADATA

if TYPE_CHECKING:
    from pathlib import Path

# Every test here migrates (or checks) a database of its own from empty.
pytestmark = pytest.mark.empty_database


def _schema_diff(db: Database) -> list[object]:
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, METADATA))


def test_migrated_schema_matches_orm_metadata(database_url: str) -> None:
    upgrade(database_url)
    db = Database(database_url)
    try:
        assert _schema_diff(db) == []
    finally:
        db.dispose()


def test_fresh_database_is_not_current(database_url: str) -> None:
    db = Database(database_url)
    try:
        assert current_revision(db.engine) is None
    finally:
        db.dispose()
    assert not is_current(database_url)


def test_upgrade_reaches_head(database_url: str) -> None:
    upgrade(database_url)
    db = Database(database_url)
    try:
        assert current_revision(db.engine) == head_revision() == "0014"
    finally:
        db.dispose()
    assert is_current(database_url)


def test_upgrade_twice_is_a_no_op(database_url: str) -> None:
    upgrade(database_url)
    db = Database(database_url)
    try:
        before = inspect(db.engine).get_table_names()
        upgrade(database_url)
        db.dispose()
        assert sorted(inspect(db.engine).get_table_names()) == sorted(before)
        assert current_revision(db.engine) == head_revision()
        assert _schema_diff(db) == []
    finally:
        db.dispose()


def test_constraints_carry_conventional_names(database: Database) -> None:
    inspector = inspect(database.engine)
    assert inspector.get_pk_constraint("api_keys")["name"] == "pk_api_keys"
    unique = {c["name"] for c in inspector.get_unique_constraints("api_keys")}
    assert unique == {"uq_api_keys_key_id", "uq_api_keys_request_id"}
    checks = {c["name"] for c in inspector.get_check_constraints("api_keys")}
    assert checks == {"ck_api_keys_role"}


def test_downgrade_to_base_and_back(database_url: str) -> None:
    from alembic import command

    from posguard_server.store.migrate import alembic_config

    upgrade(database_url)
    db = Database(database_url)
    try:
        with db.engine.begin() as connection:
            command.downgrade(alembic_config(connection), "base")
        assert "api_keys" not in inspect(db.engine).get_table_names()
        assert current_revision(db.engine) is None
    finally:
        db.dispose()
    upgrade(database_url)
    assert is_current(database_url)


def test_the_comparison_notices_drift(database: Database) -> None:
    # Guards the tests above against passing vacuously: a changed length and a new column must show up.
    from sqlalchemy import Column, Integer, MetaData, String

    drifted = MetaData(naming_convention=METADATA.naming_convention)
    for other in METADATA.tables.values():
        other.to_metadata(drifted)
    table = drifted.tables["api_keys"]
    table.c.name.type = String(101)
    table.append_column(Column("extra", Integer, nullable=True))
    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diff = compare_metadata(context, drifted)
    kinds = {entry[0][0] if isinstance(entry, list) else entry[0] for entry in diff}
    assert kinds == {"modify_type", "add_column"}


def test_concurrent_upgrades_both_succeed(database_url: str) -> None:
    # Replicas that start together all run `upgrade`; the loser must wait, then find nothing to do.
    import threading

    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def run() -> None:
        barrier.wait()
        try:
            upgrade(database_url)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert is_current(database_url)


def test_sqlite_migrations_run_without_foreign_key_enforcement(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/posguard.db")
    try:
        with migration_connection(db) as connection:
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 0
        with db.session(read_only=True) as session:
            assert session.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        db.dispose()


def test_models_stored_before_checksums_get_theirs_from_their_bytes(database_url: str) -> None:
    """Revision 0011 computes the checksum of every artifact already stored: every model loads as before."""
    upgrade(database_url, "0008")
    artifacts = {f"v{n}": bytes(range(n, 256)) * (n + 1) for n in range(1, 4)}
    db = Database(database_url)
    try:
        with db.engine.begin() as connection:
            for version, artifact in artifacts.items():
                connection.execute(
                    text(
                        "INSERT INTO risk_models (scope, customer_id, version, status, created_at,"
                        " training_window_start, training_window_end, sample_count, metrics, artifact)"
                        " VALUES ('GLOBAL', NULL, :version, 'CANDIDATE', :at, :at, :at, 1, '{}', :artifact)"
                    ),
                    {"version": version, "at": "2025-03-01 12:00:00", "artifact": artifact},
                )
        upgrade(database_url)
        models = {model.version: model for model in SqlModelRegistry(db).list_models()[0]}
        for version, artifact in artifacts.items():
            record = SqlModelRegistry(db).get_model(ModelScope.GLOBAL, "", version)
            assert record is not None
            assert models[version].artifact_sha256 == hashlib.sha256(artifact).hexdigest()
            assert record.verified_artifact() == artifact
    finally:
        db.dispose()
