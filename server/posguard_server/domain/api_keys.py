"""API keys: what a key is, how it is generated, and how a presented key is checked.

A key as shown to its owner is ``pgk_<key_id>_<secret>``. ``key_id`` is public (it appears in logs, audit
entries and ``ListApiKeys``); only a SHA-256 digest of the secret is stored. The secret carries 256 bits
from ``secrets``, so a fast digest is enough: there is nothing to brute-force, unlike a password.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

KEY_PREFIX = "pgk"
_KEY_ID_BYTES = 6  # 12 hex characters: short enough to read in a log, unique enough per installation


class Role(enum.Enum):
    """Who a key acts as; the role matrix in ``posguard_server.api.access`` says what each may call."""

    GATEWAY = "gateway"
    ADMIN = "admin"
    AUDITOR = "auditor"
    TRAINER = "trainer"
    ANALYST = "analyst"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key, without its secret."""

    key_id: str
    name: str
    role: Role
    created_at: datetime
    created_by: str
    revoked_at: datetime | None = None
    revoked_by: str | None = None
    revoke_reason: str | None = None
    request_id: str | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True, slots=True)
class NewKey:
    """A freshly generated key: ``token`` is shown once and never stored."""

    key_id: str
    token: str
    secret_hash: str


def generate_key() -> NewKey:
    key_id = secrets.token_hex(_KEY_ID_BYTES)
    secret = secrets.token_urlsafe(32)
    return NewKey(key_id=key_id, token=f"{KEY_PREFIX}_{key_id}_{secret}", secret_hash=hash_secret(secret))


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_token(token: str) -> tuple[str, str] | None:
    """Split a presented token into (key_id, secret), or None when it is not shaped like one of ours."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        return None
    key_id, secret = parts[1], parts[2]
    if len(key_id) != 2 * _KEY_ID_BYTES or not all(c in "0123456789abcdef" for c in key_id) or not secret:
        return None
    return key_id, secret


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


class ApiKeyRepository(Protocol):
    """Where keys live; implemented by ``posguard_server.store.SqlApiKeyStore``."""

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
    ) -> tuple[ApiKey, bool]: ...

    def get(self, key_id: str) -> ApiKey | None: ...

    def find_for_auth(self, key_id: str) -> tuple[ApiKey, str] | None: ...

    def list(
        self, *, role: Role | None, include_revoked: bool, limit: int, after: int | None
    ) -> tuple[list[ApiKey], int | None]: ...

    def revoke(
        self,
        key_id: str,
        *,
        revoked_by: str,
        reason: str,
        now: datetime,
        request_id: str | None = None,
        fingerprint: str = "",
    ) -> ApiKey: ...

    def count_active(self, role: Role | None = None) -> int: ...


def create_key(
    keys: ApiKeyRepository,
    *,
    name: str,
    role: Role,
    created_by: str,
    request_id: str | None = None,
    now: datetime | None = None,
) -> tuple[ApiKey, str | None]:
    """Create a key and return it with its token, or with None when ``request_id`` replays an earlier call.

    A replay cannot show the token again: only its digest was stored.
    """
    new = generate_key()
    key, created = keys.create(
        key_id=new.key_id,
        name=name,
        role=role,
        secret_hash=new.secret_hash,
        created_by=created_by,
        request_id=request_id,
        now=now or datetime.now(UTC),
    )
    return key, (new.token if created else None)
