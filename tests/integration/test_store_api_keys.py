"""The API key store and the session scope, against SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import func, select, text

from posguard_server.domain.api_keys import ApiKey, Role
from posguard_server.domain.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from posguard_server.store.api_keys import SqlApiKeyStore
from posguard_server.store.db import Database, normalize_url
from posguard_server.store.schema import SqlApiKey

if TYPE_CHECKING:
    from pathlib import Path

NOW = datetime(2025, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)


@pytest.fixture
def store(database: Database) -> SqlApiKeyStore:
    return SqlApiKeyStore(database)


def _create(
    store: SqlApiKeyStore,
    key_id: str,
    *,
    name: str = "till 7",
    role: Role = Role.GATEWAY,
    request_id: str | None = None,
    now: datetime = NOW,
) -> tuple[ApiKey, bool]:
    return store.create(
        key_id=key_id,
        name=name,
        role=role,
        secret_hash="ab" * 32,
        created_by="bootstrap",
        request_id=request_id,
        now=now,
    )


def _all_pages(
    store: SqlApiKeyStore, *, role: Role | None = None, include_revoked: bool = False, limit: int = 3
) -> list[list[str]]:
    pages: list[list[str]] = []
    after: int | None = None
    while True:
        page, after = store.list(role=role, include_revoked=include_revoked, limit=limit, after=after)
        pages.append([key.key_id for key in page])
        if after is None:
            return pages


def test_create_then_get(store: SqlApiKeyStore) -> None:
    key, created = _create(store, "k1", name="ops console", role=Role.ADMIN, request_id="req-1")

    assert created
    assert key == ApiKey(
        key_id="k1",
        name="ops console",
        role=Role.ADMIN,
        created_at=NOW,
        created_by="bootstrap",
        request_id="req-1",
    )
    assert not key.revoked
    assert store.get("k1") == key
    assert store.get("missing") is None


def test_find_for_auth_returns_the_secret_hash(store: SqlApiKeyStore) -> None:
    key, _ = _create(store, "k1")

    assert store.find_for_auth("k1") == (key, "ab" * 32)
    assert store.find_for_auth("missing") is None


def test_timestamps_come_back_as_aware_utc(store: SqlApiKeyStore) -> None:
    beijing = timezone(timedelta(hours=8))
    created_local = datetime(2025, 3, 1, 20, 30, 15, 123456, tzinfo=beijing)

    returned, _ = _create(store, "k1", now=created_local)
    revoked = store.revoke("k1", revoked_by="admin1", reason="lost", now=created_local + timedelta(hours=1))
    stored = store.get("k1")

    assert stored is not None
    for moment in (returned.created_at, stored.created_at, revoked.revoked_at, stored.revoked_at):
        assert moment is not None
        assert moment.tzinfo is not None
        assert moment.utcoffset() == timedelta(0)
    assert returned.created_at == stored.created_at == NOW
    assert stored.revoked_at == NOW + timedelta(hours=1)


def test_naive_timestamps_are_refused(store: SqlApiKeyStore) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        _create(store, "k1", now=datetime(2025, 3, 1, 12, 0))


def test_list_pages_through_every_key_once_in_order(store: SqlApiKeyStore) -> None:
    key_ids = [f"k{i}" for i in range(7)]
    for key_id in key_ids:
        _create(store, key_id)

    pages = _all_pages(store, limit=3)

    assert pages == [["k0", "k1", "k2"], ["k3", "k4", "k5"], ["k6"]]


def test_list_last_full_page_has_no_cursor(store: SqlApiKeyStore) -> None:
    for i in range(6):
        _create(store, f"k{i}")

    assert _all_pages(store, limit=3) == [["k0", "k1", "k2"], ["k3", "k4", "k5"]]
    assert store.list(role=None, include_revoked=False, limit=3, after=None)[1] is not None


def test_list_filters_by_role_and_revocation(store: SqlApiKeyStore) -> None:
    roles = [Role.GATEWAY, Role.ADMIN, Role.GATEWAY, Role.AUDITOR, Role.GATEWAY, Role.TRAINER, Role.GATEWAY]
    for i, role in enumerate(roles):
        _create(store, f"k{i}", role=role)
    store.revoke("k2", revoked_by="admin1", reason="rotated", now=NOW)
    store.revoke("k3", revoked_by="admin1", reason="rotated", now=NOW)

    assert _all_pages(store, role=Role.GATEWAY) == [["k0", "k4", "k6"]]
    assert _all_pages(store, role=Role.GATEWAY, include_revoked=True) == [["k0", "k2", "k4"], ["k6"]]
    assert _all_pages(store, include_revoked=True, limit=10) == [[f"k{i}" for i in range(7)]]
    assert _all_pages(store, limit=10) == [["k0", "k1", "k4", "k5", "k6"]]
    assert _all_pages(store, role=Role.AUDITOR) == [[]]


def test_list_rejects_an_empty_page(store: SqlApiKeyStore) -> None:
    with pytest.raises(ValueError, match="limit"):
        store.list(role=None, include_revoked=False, limit=0, after=None)


def test_revoke_records_who_when_and_why(store: SqlApiKeyStore) -> None:
    _create(store, "k1")

    revoked = store.revoke("k1", revoked_by="admin1", reason="device stolen", now=NOW + timedelta(days=1))

    assert revoked.revoked
    assert revoked.revoked_at == NOW + timedelta(days=1)
    assert revoked.revoked_by == "admin1"
    assert revoked.revoke_reason == "device stolen"
    assert store.get("k1") == revoked


def test_revoking_twice_keeps_the_first_revocation(store: SqlApiKeyStore) -> None:
    _create(store, "k1")
    first = store.revoke("k1", revoked_by="admin1", reason="device stolen", now=NOW)

    again = store.revoke("k1", revoked_by="admin2", reason="cleanup", now=NOW + timedelta(hours=2))

    assert again == first
    assert store.get("k1") == first


def test_revoking_a_missing_key_is_not_found(store: SqlApiKeyStore) -> None:
    with pytest.raises(NotFound) as caught:
        store.revoke("nope", revoked_by="admin1", reason="x", now=NOW)
    assert caught.value.reason == "API_KEY_NOT_FOUND"


def test_count_active(store: SqlApiKeyStore) -> None:
    _create(store, "k1", role=Role.ADMIN)
    _create(store, "k2", role=Role.ADMIN)
    _create(store, "k3", role=Role.GATEWAY)
    store.revoke("k2", revoked_by="admin1", reason="x", now=NOW)

    assert store.count_active() == 2
    assert store.count_active(Role.ADMIN) == 1
    assert store.count_active(Role.GATEWAY) == 1
    assert store.count_active(Role.TRAINER) == 0


def test_retry_with_the_same_request_id_returns_the_first_key(
    store: SqlApiKeyStore, database: Database
) -> None:
    first, created = _create(store, "k1", request_id="req-1")

    # A retry generates a fresh key_id; the stored key must win and nothing new be written.
    again, created_again = _create(store, "k2", request_id="req-1", now=NOW + timedelta(seconds=5))

    assert created
    assert not created_again
    assert again == first
    assert store.get("k2") is None
    with database.session(read_only=True) as session:
        assert session.scalar(select(func.count()).select_from(SqlApiKey)) == 1


def test_request_id_reused_for_a_different_request(store: SqlApiKeyStore) -> None:
    _create(store, "k1", name="till 7", role=Role.GATEWAY, request_id="req-1")

    for name, role in [("till 8", Role.GATEWAY), ("till 7", Role.ADMIN)]:
        with pytest.raises(InvalidArgument) as caught:
            _create(store, "k2", name=name, role=role, request_id="req-1")
        assert caught.value.reason == "IDEMPOTENCY_CONFLICT"
        assert [v.field for v in caught.value.violations] == ["request_id"]
    assert store.get("k2") is None


def test_concurrent_retries_create_one_key(store: SqlApiKeyStore) -> None:
    workers = 8
    barrier = threading.Barrier(workers)
    results: list[tuple[ApiKey, bool]] = []
    errors: list[BaseException] = []

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            results.append(_create(store, f"k{i}", request_id="req-1"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert sum(created for _, created in results) == 1
    assert len({key.key_id for key, _ in results}) == 1
    assert store.count_active() == 1


def test_duplicate_key_id_already_exists(store: SqlApiKeyStore) -> None:
    _create(store, "k1", name="first")

    with pytest.raises(AlreadyExists) as caught:
        _create(store, "k1", name="second")

    assert caught.value.reason == "ALREADY_EXISTS"
    assert "UNIQUE" not in caught.value.message.upper()
    stored = store.get("k1")
    assert stored is not None
    assert stored.name == "first"


def test_duplicate_key_id_with_a_request_id_already_exists(store: SqlApiKeyStore) -> None:
    _create(store, "k1", request_id="req-1")

    with pytest.raises(AlreadyExists):
        _create(store, "k1", request_id="req-2")


def test_over_long_values_are_invalid_arguments(store: SqlApiKeyStore) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _create(store, "k1", name="x" * 101)
    assert [v.field for v in caught.value.violations] == ["name"]
    with pytest.raises(InvalidArgument):
        _create(store, "k1", request_id="r" * 129)
    _create(store, "k1")
    with pytest.raises(InvalidArgument):
        store.revoke("k1", revoked_by="admin1", reason="x" * 501, now=NOW)
    assert store.count_active() == 1


def _row(key_id: str) -> SqlApiKey:
    return SqlApiKey(
        key_id=key_id,
        name="n",
        role=Role.GATEWAY.value,
        secret_hash="h",
        created_at=NOW,
        created_by="bootstrap",
    )


def _write_then_fail(database: Database, error: Exception) -> None:
    with database.session() as session:
        session.add(_row("k1"))
        session.flush()  # the row really reached the database before the failure
        raise error


def test_session_rolls_back_on_an_exception(database: Database, store: SqlApiKeyStore) -> None:
    class BoomError(Exception):
        pass

    with pytest.raises(BoomError):
        _write_then_fail(database, BoomError())

    assert store.get("k1") is None


def test_domain_errors_pass_through_the_session_unchanged(database: Database, store: SqlApiKeyStore) -> None:
    error = FailedPrecondition("not now", reason="TEST")

    with pytest.raises(FailedPrecondition) as caught:
        _write_then_fail(database, error)

    assert caught.value is error
    assert store.get("k1") is None


def test_session_commits_on_success(database: Database, store: SqlApiKeyStore) -> None:
    with database.session() as session:
        session.add(_row("k1"))

    assert store.get("k1") is not None


def test_integrity_errors_become_already_exists(database: Database) -> None:
    with database.session() as session:
        session.add(_row("k1"))

    with pytest.raises(AlreadyExists) as caught, database.session() as session:
        session.add(_row("k1"))

    assert caught.value.reason == "ALREADY_EXISTS"
    assert caught.value.__cause__ is not None  # the driver error is chained, not shown


def test_check_constraint_guards_the_role(database: Database) -> None:
    row = _row("k1")
    row.role = "superuser"
    with pytest.raises(AlreadyExists), database.session() as session:
        session.add(row)


def test_unreachable_postgresql_is_unavailable() -> None:
    db = Database("postgresql://postgres@127.0.0.1:1/test")
    try:
        with pytest.raises(Unavailable) as caught, db.session() as session:
            session.execute(text("SELECT 1"))
        assert caught.value.reason == "STORAGE_UNAVAILABLE"
        assert caught.value.message == "the database is unavailable; retry later"
        assert "127.0.0.1" not in str(caught.value)

        with pytest.raises(Unavailable):
            SqlApiKeyStore(db).get("k1")
    finally:
        db.dispose()


def test_unusable_sqlite_file_is_unavailable(tmp_path: Path) -> None:
    # A directory where the database file should be: SQLite cannot open it.
    (tmp_path / "posguard.db").mkdir()
    db = Database(f"sqlite:///{tmp_path}/posguard.db")
    try:
        with pytest.raises(Unavailable), db.session(read_only=True) as session:
            session.execute(text("SELECT 1"))
    finally:
        db.dispose()


def test_sqlite_connections_are_durable_and_enforce_keys(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/nested/dir/posguard.db")
    try:
        assert db.dialect == "sqlite"
        with db.session(read_only=True) as session:
            pragmas = {
                name: session.execute(text(f"PRAGMA {name}")).scalar()
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }
        assert pragmas == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1, "busy_timeout": 5000}
        assert (tmp_path / "nested" / "dir" / "posguard.db").exists()
    finally:
        db.dispose()


def test_in_memory_sqlite_is_refused() -> None:
    with pytest.raises(ValueError, match="file"):
        Database("sqlite://")
    with pytest.raises(ValueError, match="file"):
        Database("sqlite:///:memory:")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p@db:5432/posguard", "postgresql+psycopg://u:p@db:5432/posguard"),
        ("postgres://u@db/posguard", "postgresql+psycopg://u@db/posguard"),
        ("postgresql+psycopg://u@db/posguard", "postgresql+psycopg://u@db/posguard"),
        ("sqlite:///var/posguard.db", "sqlite:///var/posguard.db"),
        ("sqlite:////abs/posguard.db", "sqlite:////abs/posguard.db"),
    ],
)
def test_normalize_url(given: str, expected: str) -> None:
    assert normalize_url(given) == expected


def test_repr_hides_the_password() -> None:
    db = Database("postgresql://posguard:s3cret@127.0.0.1:1/posguard")
    try:
        assert "s3cret" not in repr(db)
        assert db.dialect == "postgresql"
    finally:
        db.dispose()
