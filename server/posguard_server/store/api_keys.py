"""Storage of API keys; rows are translated to ``posguard_server.domain.api_keys.ApiKey`` on the way out."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from posguard_server.domain.api_keys import ApiKey, Role
from posguard_server.domain.errors import AlreadyExists, InvalidArgument, NotFound
from posguard_server.store.audit import append_event
from posguard_server.store.idempotency import earlier_call, record_call
from posguard_server.store.schema import (
    API_KEY_NAME_MAX,
    REQUEST_ID_MAX,
    REVOKE_REASON_MAX,
    SqlApiKey,
)

if TYPE_CHECKING:
    import builtins

    from sqlalchemy.orm import Session

    from posguard_server.store.db import Database


_REVOKED = "api_key.revoked"


class SqlApiKeyStore:
    """API keys in the SQL database behind ``Database``."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def create(
        self,
        *,
        key_id: str,
        name: str,
        role: Role,
        secret_hash: str,
        created_by: str,
        request_id: str | None,
        now: datetime,
    ) -> tuple[ApiKey, bool]:
        """Store a new key and return ``(key, True)``.

        A retry with the ``request_id`` of an earlier create by the same ``created_by`` returns
        ``(earlier key, False)`` and stores nothing; reusing a ``request_id`` for a different name or role is
        an ``InvalidArgument``. Another caller's ``request_id`` is not this caller's: it creates a key.
        A clash on ``key_id`` is ``AlreadyExists``.
        """
        _check_length("name", name, API_KEY_NAME_MAX)
        now = _utc(now)
        if request_id is not None:
            _check_length("request_id", request_id, REQUEST_ID_MAX)
        try:
            with self._db.session() as session:
                if request_id is not None:
                    earlier = _by_request_id(session, created_by, request_id)
                    if earlier is not None:
                        return _replay(earlier, name=name, role=role), False
                row = SqlApiKey(
                    key_id=key_id,
                    name=name,
                    role=role.value,
                    secret_hash=secret_hash,
                    created_at=now,
                    created_by=created_by,
                    request_id=request_id,
                )
                session.add(row)
                session.flush()
                # In the same transaction: the key exists if and only if its creation is on record.
                append_event(
                    session,
                    actor=created_by,
                    action="api_key.created",
                    subject=key_id,
                    details={"role": role.value, "name": name, "created_by": created_by},
                    now=now,
                )
                return _to_domain(row), True
        except AlreadyExists as exc:
            # On PostgreSQL a concurrent retry can pass the check above and commit first; the unique
            # index on request_id stops the second insert, and the winner's key is the answer.
            if request_id is not None:
                with self._db.session(read_only=True) as session:
                    earlier = _by_request_id(session, created_by, request_id)
                    if earlier is not None:
                        return _replay(earlier, name=name, role=role), False
            raise AlreadyExists(
                "an API key with this key_id already exists", reason="ALREADY_EXISTS"
            ) from exc

    def get(self, key_id: str) -> ApiKey | None:
        with self._db.session(read_only=True) as session:
            row = _by_key_id(session, key_id)
            return None if row is None else _to_domain(row)

    def find_for_auth(self, key_id: str) -> tuple[ApiKey, str] | None:
        """The key and its stored secret digest, for checking a presented token; revoked keys included."""
        with self._db.session(read_only=True) as session:
            row = _by_key_id(session, key_id)
            return None if row is None else (_to_domain(row), row.secret_hash)

    def list(
        self, *, role: Role | None, include_revoked: bool, limit: int, after: int | None
    ) -> tuple[builtins.list[ApiKey], int | None]:
        """One page of keys in creation order, and the cursor for the next page (None after the last).

        The cursor is an opaque position: pass it back as ``after``. Keyset paging stays correct while keys
        are added or revoked between pages, and costs the same on the last page as on the first.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        query = select(SqlApiKey).order_by(SqlApiKey.id).limit(limit + 1)
        if role is not None:
            query = query.where(SqlApiKey.role == role.value)
        if not include_revoked:
            query = query.where(SqlApiKey.revoked_at.is_(None))
        if after is not None:
            query = query.where(SqlApiKey.id > after)
        with self._db.session(read_only=True) as session:
            # One row beyond the page tells whether another page exists without a second query.
            rows = session.scalars(query).all()
            page = rows[:limit]
            cursor = page[-1].id if len(rows) > limit else None
            return [_to_domain(row) for row in page], cursor

    def revoke(
        self,
        key_id: str,
        *,
        revoked_by: str,
        reason: str,
        now: datetime,
        request_id: str | None = None,
        fingerprint: str = "",
    ) -> ApiKey:
        """Revoke a key; revoking it again changes nothing and returns it as first revoked.

        With a ``request_id``, the call is kept as ``revoked_by``'s: a retry (same ``fingerprint``) replays
        and another request under it is an ``InvalidArgument`` (IDEMPOTENCY_CONFLICT).
        """
        _check_length("reason", reason, REVOKE_REASON_MAX)
        now = _utc(now)
        with self._db.session() as session:
            # The row lock makes concurrent revokes of one key agree on who revoked it first.
            row = session.scalars(
                select(SqlApiKey).where(SqlApiKey.key_id == key_id).with_for_update()
            ).one_or_none()
            done = (
                None
                if request_id is None
                else earlier_call(session, _REVOKED, revoked_by, request_id, fingerprint)
            )
            if done is not None and row is not None:
                # The same request names the same key, so the key as it is now is the first answer.
                return _to_domain(row)
            if row is None:
                raise NotFound(
                    "no API key with this key_id", reason="API_KEY_NOT_FOUND", metadata={"key_id": key_id}
                )
            if row.revoked_at is None:
                row.revoked_at = now
                row.revoked_by = revoked_by
                row.revoke_reason = reason
                # Only the first revocation changes anything, so only it is recorded.
                append_event(
                    session,
                    actor=revoked_by,
                    action=_REVOKED,
                    subject=key_id,
                    details={"reason": reason},
                    now=now,
                )
            if request_id is not None:
                record_call(session, _REVOKED, revoked_by, request_id, fingerprint, customer_id="", now=now)
            return _to_domain(row)

    def count_active(self, role: Role | None = None) -> int:
        query = select(func.count()).select_from(SqlApiKey).where(SqlApiKey.revoked_at.is_(None))
        if role is not None:
            query = query.where(SqlApiKey.role == role.value)
        with self._db.session(read_only=True) as session:
            return session.scalar(query) or 0


def _by_key_id(session: Session, key_id: str) -> SqlApiKey | None:
    return session.scalars(select(SqlApiKey).where(SqlApiKey.key_id == key_id)).one_or_none()


def _by_request_id(session: Session, created_by: str, request_id: str) -> SqlApiKey | None:
    """The key ``created_by`` created with this request_id: request ids are their callers' own."""
    return session.scalars(
        select(SqlApiKey).where(SqlApiKey.request_id == request_id, SqlApiKey.created_by == created_by)
    ).one_or_none()


def _replay(earlier: SqlApiKey, *, name: str, role: Role) -> ApiKey:
    if earlier.name != name or earlier.role != role.value:
        raise InvalidArgument.field(
            "request_id", "was already used for a different request", reason="IDEMPOTENCY_CONFLICT"
        )
    return _to_domain(earlier)


def _check_length(field: str, value: str, maximum: int) -> None:
    if len(value) > maximum:
        raise InvalidArgument.field(field, f"must be at most {maximum} characters")


def _utc(moment: datetime) -> datetime:
    # Rows just written are answered from memory, not re-read; normalise now so they match what a later
    # read returns.
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("timestamps must be timezone-aware")
    return moment.astimezone(UTC)


def _to_domain(row: SqlApiKey) -> ApiKey:
    return ApiKey(
        key_id=row.key_id,
        name=row.name,
        role=Role(row.role),
        created_at=row.created_at,
        created_by=row.created_by,
        revoked_at=row.revoked_at,
        revoked_by=row.revoked_by,
        revoke_reason=row.revoke_reason,
        request_id=row.request_id,
    )
