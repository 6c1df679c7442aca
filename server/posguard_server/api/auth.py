"""Who is calling: API keys from ``authorization: Bearer <key>`` metadata, checked against stored digests.

Keys are cached for ``auth_cache_seconds`` so the hot path does not hit the database on every call: a key's
row as read from the store (by key id; a key id the store does not know for at most
``_UNKNOWN_KEY_SECONDS``), and a token verified against it, by a digest of the whole token
(:func:`_token_digest`), so a call that presents a token already verified costs one digest and one dictionary
lookup (:meth:`ApiKeyAuthenticator.verified`, no coroutine). A verified token is
trusted no longer than the row it was verified against: a revocation made through this process drops both
at once, one made elsewhere takes effect within the cache lifetime.

The key id is the caller's choice, so a caller sending a new well-formed id on every call makes the server
read the database on every call, and the negative cache cannot help. Reads of ids this process has no key
row for run on a few threads of their own, at most ``lookup_limit`` at once; beyond that such a call is
refused at once with RESOURCE_EXHAUSTED, costing no read and no thread. Keys this process has seen are
re-read apart from that limit, so a flood of made-up ids cannot lock out the keys in use. Concurrent reads of
one key id share one database read.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from posguard_server.domain.api_keys import ApiKey, Role, parse_token, secret_matches
from posguard_server.domain.errors import ResourceExhausted, Unauthenticated

ALL_ROLES = frozenset(Role)
# A key created elsewhere is usable here at most this long after a call named its id before it existed.
_UNKNOWN_KEY_SECONDS = 1.0
# Key ids the store does not know are remembered up to this many at once: callers choose them.
_UNKNOWN_KEYS_KEPT = 10_000
_BUSY = "the server is busy checking API keys; retry after a short backoff"
Metadata = Sequence[tuple[str, str | bytes]]


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of an RPC. ``key_id`` is what logs and audit entries name; it is not a secret."""

    key_id: str
    roles: frozenset[Role]


LOCAL_DEVELOPER = Principal(key_id="local-no-auth", roles=ALL_ROLES)


class KeyLookup(Protocol):
    def find_for_auth(self, key_id: str) -> tuple[ApiKey, str] | None: ...


class Authenticator(Protocol):
    def verified(self, metadata: Metadata) -> Principal | None: ...
    async def authenticate(self, metadata: Metadata) -> Principal: ...

    def invalidate(self, key_id: str) -> None: ...

    def close(self) -> None: ...


def bearer_token(metadata: Metadata) -> str | None:
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _token_digest(token: str) -> bytes:
    """What a verified token is remembered by. BLAKE2b, which Python implements itself, rather than SHA-256
    through OpenSSL: computed on every call, it cost 2.6 µs less per call in a server under load (OpenSSL's
    provider dispatch runs on cold caches there), and is as strong a hash for this."""
    return hashlib.blake2b(token.encode(), digest_size=32).digest()


@dataclass(frozen=True, slots=True)
class _Row:
    """A key's row as the store had it at ``read_at`` (``key`` None: no such key), and its principal."""

    read_at: float
    key: ApiKey | None
    secret_hash: str = ""
    principal: Principal | None = None


class ApiKeyAuthenticator:
    """Checks bearer tokens against the key store, with a short-lived cache of rows and verified tokens."""

    def __init__(
        self,
        keys: KeyLookup,
        *,
        cache_seconds: float,
        lookup_limit: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if lookup_limit < 1:
            raise ValueError("lookup_limit must be at least 1")
        self._keys = keys
        self._cache_seconds = cache_seconds
        self._unknown_seconds = min(cache_seconds, _UNKNOWN_KEY_SECONDS)
        self._clock = clock
        self._rows: dict[str, _Row] = {}  # by key id
        self._unknown: dict[str, float] = {}  # key id -> when the store said it has no such key
        self._verified: dict[bytes, _Row] = {}  # by the digest of a token that matched the row's secret
        # Reads in progress by key id, shared by the calls that wait for the same key.
        self._reading: dict[str, asyncio.Future[_Row]] = {}
        self._lookup_limit = lookup_limit
        self._strangers = 0  # reads in progress of key ids with no row here (see the module's docstring)
        self._stranger_threads = ThreadPoolExecutor(lookup_limit, thread_name_prefix="posguard-auth")

    def verified(self, metadata: Metadata) -> Principal | None:
        """The caller, when it presents a token verified here against a row still fresh; else None, and
        :meth:`authenticate` decides. Nearly every call is answered here, without a coroutine."""
        token = bearer_token(metadata)
        if token is None:
            return None
        row = self._fresh(_token_digest(token))
        return None if row is None else row.principal

    async def authenticate(self, metadata: Metadata) -> Principal:
        token = bearer_token(metadata)
        if token is None:
            raise Unauthenticated(
                "missing API key: send metadata 'authorization: Bearer <key>'", reason="API_KEY_MISSING"
            )
        digest = _token_digest(token)
        row = self._fresh(digest)
        if row is None:
            row = await self._verify(token, digest)
        if row.principal is None:
            raise Unauthenticated("the API key has been revoked", reason="API_KEY_REVOKED")
        return row.principal

    def _fresh(self, digest: bytes) -> _Row | None:
        """The row a token with this digest was verified against, unless it is older than the cache allows."""
        row = self._verified.get(digest)
        if row is None or self._clock() - row.read_at >= self._cache_seconds:
            return None
        return row

    async def _verify(self, token: str, digest: bytes) -> _Row:
        """The row ``token`` matches, remembered under ``digest``; raises when it matches none."""
        self._verified.pop(digest, None)
        parsed = parse_token(token)
        if parsed is None:
            raise Unauthenticated("the API key is not valid", reason="API_KEY_INVALID")
        key_id, secret = parsed
        row = await self._lookup(key_id)
        # One answer for "no such key" and "wrong secret": a caller learns nothing about which key ids exist.
        if row.key is None or not secret_matches(secret, row.secret_hash):
            raise Unauthenticated("the API key is not valid", reason="API_KEY_INVALID")
        self._verified[digest] = row
        return row

    async def _lookup(self, key_id: str) -> _Row:
        now = self._clock()
        row = self._rows.get(key_id)
        if row is not None and now - row.read_at < self._cache_seconds:
            return row
        unknown_since = self._unknown.get(key_id)
        if unknown_since is not None and now - unknown_since < self._unknown_seconds:
            return _Row(unknown_since, None)
        reading = self._reading.get(key_id)
        if reading is None:
            threads = None  # the loop's default executor
            if row is None:  # an id with no row here: the caller may have made it up
                if self._strangers >= self._lookup_limit:
                    raise ResourceExhausted(_BUSY, reason="OVERLOADED")
                self._strangers += 1
                threads = self._stranger_threads
            reading = asyncio.ensure_future(self._read(key_id, threads))
            self._reading[key_id] = reading
            if threads is not None:
                reading.add_done_callback(self._stranger_done)
            # Retrieved even when every waiter has gone (cancelled), so the loop does not warn about it.
            reading.add_done_callback(lambda done: done.cancelled() or done.exception())
        # Shielded: a waiter that is cancelled (its deadline) does not cancel the others' read.
        return await asyncio.shield(reading)

    def _stranger_done(self, _: object) -> None:
        self._strangers -= 1

    async def _read(self, key_id: str, threads: ThreadPoolExecutor | None) -> _Row:
        """Read ``key_id``'s row from the store on ``threads``; remember it unless invalidated meanwhile."""
        now = self._clock()
        this = asyncio.current_task()
        loop = asyncio.get_running_loop()
        try:
            found = await loop.run_in_executor(threads, self._keys.find_for_auth, key_id)
        finally:
            # Invalidated while it was read, what was read may predate the change: answer it, keep nothing.
            current = self._reading.get(key_id) is this
            if current:
                del self._reading[key_id]
        if current:
            self.invalidate(key_id)
        if found is None:
            if current:
                if len(self._unknown) >= _UNKNOWN_KEYS_KEPT:
                    self._unknown.clear()
                self._unknown[key_id] = now
            return _Row(now, None)
        key, secret_hash = found
        principal = None if key.revoked else Principal(key_id=key.key_id, roles=frozenset({key.role}))
        row = _Row(now, key, secret_hash, principal)
        if current:
            self._rows[key_id] = row
        return row

    def invalidate(self, key_id: str) -> None:
        self._rows.pop(key_id, None)
        self._unknown.pop(key_id, None)
        self._reading.pop(key_id, None)  # a read in progress may have started before the change
        for digest in [d for d, row in self._verified.items() if row.key and row.key.key_id == key_id]:
            del self._verified[digest]

    def close(self) -> None:
        """Let the key-lookup threads go (a read in progress finishes first, unwaited)."""
        self._stranger_threads.shutdown(wait=False)


class NoAuthenticator:
    """Every caller is a local developer with every role. Only reachable through ``insecure_no_auth``."""

    def verified(self, metadata: Metadata) -> Principal | None:
        return LOCAL_DEVELOPER

    async def authenticate(self, metadata: Metadata) -> Principal:
        return LOCAL_DEVELOPER

    def invalidate(self, key_id: str) -> None:
        return None

    def close(self) -> None:
        return None
