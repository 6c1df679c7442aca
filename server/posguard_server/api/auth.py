"""Who is calling: API keys from ``authorization: Bearer <key>`` metadata, checked against stored digests.

Verified keys are cached for ``auth_cache_seconds`` so the hot path does not hit the database on every
call; a revocation made through this process drops the cache entry at once, one made elsewhere takes
effect within the cache lifetime.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from posguard_server.domain.api_keys import ApiKey, Role, parse_token, secret_matches
from posguard_server.domain.errors import Unauthenticated

ALL_ROLES = frozenset(Role)


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of an RPC. ``key_id`` is what logs and audit entries name; it is not a secret."""

    key_id: str
    roles: frozenset[Role]


LOCAL_DEVELOPER = Principal(key_id="local-no-auth", roles=ALL_ROLES)


class KeyLookup(Protocol):
    def find_for_auth(self, key_id: str) -> tuple[ApiKey, str] | None: ...


class Authenticator(Protocol):
    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Principal: ...

    def invalidate(self, key_id: str) -> None: ...


def bearer_token(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class ApiKeyAuthenticator:
    """Checks bearer tokens against the key store, with a short-lived cache of verified keys."""

    def __init__(
        self, keys: KeyLookup, *, cache_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._keys = keys
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[str, tuple[float, ApiKey, str]] = {}

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Principal:
        token = bearer_token(metadata)
        if token is None:
            raise Unauthenticated(
                "missing API key: send metadata 'authorization: Bearer <key>'", reason="API_KEY_MISSING"
            )
        parsed = parse_token(token)
        if parsed is None:
            raise Unauthenticated("the API key is not valid", reason="API_KEY_INVALID")
        key_id, secret = parsed
        found = await self._lookup(key_id)
        # One answer for "no such key" and "wrong secret": a caller learns nothing about which key ids exist.
        if found is None or not secret_matches(secret, found[1]):
            raise Unauthenticated("the API key is not valid", reason="API_KEY_INVALID")
        key = found[0]
        if key.revoked:
            raise Unauthenticated("the API key has been revoked", reason="API_KEY_REVOKED")
        return Principal(key_id=key.key_id, roles=frozenset({key.role}))

    async def _lookup(self, key_id: str) -> tuple[ApiKey, str] | None:
        now = self._clock()
        cached = self._cache.get(key_id)
        if cached is not None and now - cached[0] < self._cache_seconds:
            return cached[1], cached[2]
        found = await asyncio.to_thread(self._keys.find_for_auth, key_id)
        if found is None:
            self._cache.pop(key_id, None)
        else:
            self._cache[key_id] = (now, found[0], found[1])
        return found

    def invalidate(self, key_id: str) -> None:
        self._cache.pop(key_id, None)


class NoAuthenticator:
    """Every caller is a local developer with every role. Only reachable through ``insecure_no_auth``."""

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Principal:
        return LOCAL_DEVELOPER

    def invalidate(self, key_id: str) -> None:
        return None
