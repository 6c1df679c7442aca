"""The relational schema: one ``Sql*`` class per table, mapped with SQLAlchemy's declarative ORM.

These classes are the storage representation only. Stores translate them to the plain objects of
``posguard_server.domain`` before returning, so nothing outside ``posguard_server.store`` ever holds a row.

Every constraint and index is named through ``NAMING_CONVENTION``: Alembic can then alter or drop it by name
on every backend (SQLite's batch mode recreates tables and needs the names to carry constraints across).
The migrations under ``migrations/versions`` must produce exactly this metadata; a test compares the two.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    Dialect,
    Integer,
    MetaData,
    String,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from posguard_server.domain.api_keys import Role

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Column widths that callers validate against, so an over-long value is a clear InvalidArgument on every
# backend instead of a driver error on PostgreSQL and silent acceptance on SQLite.
KEY_ID_MAX = 32
API_KEY_NAME_MAX = 100
ROLE_MAX = 16
SECRET_HASH_MAX = 64
PRINCIPAL_MAX = 64
REVOKE_REASON_MAX = 500
REQUEST_ID_MAX = 128


def utc(value: datetime) -> datetime:
    """The same instant in UTC, as the database gives it back; ValueError for a naive value."""
    if value.tzinfo is None or value.utcoffset() is None:
        # A naive value is ambiguous (local time? UTC?); guessing would silently shift timestamps.
        raise ValueError("timestamps must be timezone-aware")
    return value.astimezone(UTC)


def sqlite_time(value: datetime) -> str:
    """``value`` as the text :class:`UTCDateTime` keeps on SQLite: UTC, no offset, to the microsecond."""
    return utc(value).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def _to_sqlite(value: datetime | None) -> str | None:
    return None if value is None else sqlite_time(value)


def _from_sqlite(value: str | None) -> datetime | None:
    if value is None:
        return None
    read = datetime.fromisoformat(value)  # what SQLAlchemy's DATETIME reads SQLite's text with
    return read.replace(tzinfo=UTC) if read.tzinfo is None else read.astimezone(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A point in time, stored as UTC and always read back as a timezone-aware UTC ``datetime``.

    PostgreSQL keeps ``timestamptz`` natively; SQLite has no time zone type and would hand back naive
    values, so the UTC convention is enforced here rather than trusted to every caller.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Callable[[datetime | None], Any] | None:
        if dialect.name == "sqlite":
            # This type's conversion and SQLite's DATETIME text in one function of the same result
            # (sqlite_time): 1.3 µs a value against 2.5 through both, and a score binds several times.
            return _to_sqlite
        return super().bind_processor(dialect)

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], datetime | None] | None:
        if dialect.name == "sqlite":
            return _from_sqlite  # likewise: DATETIME's parse and process_result_value in one
        return super().result_processor(dialect, coltype)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = utc(value)
        if dialect.name == "sqlite":
            # Stored as text without an offset: a fixed UTC convention keeps the text order chronological.
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {type(value).__name__}")
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


def _in_list(column: str, values: list[str]) -> str:
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


class SqlApiKey(Base):
    """An API key; only the SHA-256 digest of its secret is kept."""

    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint(_in_list("role", [role.value for role in Role]), name="role"),
        # A request_id is its caller's own: unique per creator, so that two concurrent retries of one
        # CreateApiKey cannot both insert; NULLs do not collide.
        UniqueConstraint("request_id", "created_by"),
    )

    # A surrogate integer key gives a stable, cheap keyset-pagination order.
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key_id: Mapped[str] = mapped_column(String(KEY_ID_MAX), unique=True)
    name: Mapped[str] = mapped_column(String(API_KEY_NAME_MAX))
    role: Mapped[str] = mapped_column(String(ROLE_MAX))
    secret_hash: Mapped[str] = mapped_column(String(SECRET_HASH_MAX))
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(PRINCIPAL_MAX))
    revoked_at: Mapped[datetime | None]
    revoked_by: Mapped[str | None] = mapped_column(String(PRINCIPAL_MAX))
    revoke_reason: Mapped[str | None] = mapped_column(String(REVOKE_REASON_MAX))
    request_id: Mapped[str | None] = mapped_column(String(REQUEST_ID_MAX))

    def __repr__(self) -> str:
        # Never includes secret_hash: reprs end up in logs and tracebacks.
        return f"SqlApiKey(id={self.id!r}, key_id={self.key_id!r}, role={self.role!r})"


def insert_for(dialect: str) -> Any:
    """The dialect's INSERT construct (with ON CONFLICT), for ``Connection.dialect.name`` or a Database's."""
    return postgresql.insert if dialect == "postgresql" else sqlite.insert
