"""The API key cache: a verified token is trusted for ``cache_seconds`` at most, an unknown key id 1 s."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from posguard_server.api.auth import ApiKeyAuthenticator
from posguard_server.domain.api_keys import ApiKey, Role, generate_key
from posguard_server.domain.errors import Unauthenticated

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class Keys:
    """A key store that counts the lookups made of it."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[ApiKey, str]] = {}
        self.lookups = 0

    def add(self) -> str:
        new = generate_key()
        key = ApiKey(key_id=new.key_id, name="till", role=Role.GATEWAY, created_at=NOW, created_by="admin")
        self.rows[new.key_id] = (key, new.secret_hash)
        return new.token

    def revoke(self, token: str) -> None:
        key, digest = self.rows[token.split("_")[1]]
        self.rows[key.key_id] = (replace(key, revoked_at=NOW, revoked_by="admin"), digest)

    def find_for_auth(self, key_id: str) -> tuple[ApiKey, str] | None:
        self.lookups += 1
        return self.rows.get(key_id)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _reason(authenticator: ApiKeyAuthenticator, token: str) -> str:
    """ "OK", or the reason the token is refused."""
    try:
        asyncio.run(authenticator.authenticate([("authorization", f"Bearer {token}")]))
    except Unauthenticated as error:
        return error.reason
    return "OK"


@pytest.fixture
def keys() -> Keys:
    return Keys()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_verified_token_is_trusted_until_the_cache_time_then_a_revocation_applies(
    keys: Keys, clock: Clock
) -> None:
    authenticator = ApiKeyAuthenticator(keys, cache_seconds=5, clock=clock)
    token = keys.add()
    assert _reason(authenticator, token) == "OK"
    keys.revoke(token)  # elsewhere: this server is not told
    clock.now += 4.9
    assert [_reason(authenticator, token) for _ in range(3)] == ["OK"] * 3
    assert keys.lookups == 1
    clock.now += 0.1
    assert _reason(authenticator, token) == "API_KEY_REVOKED"
    assert _reason(authenticator, token) == "API_KEY_REVOKED"
    assert keys.lookups == 2


def test_a_revocation_through_this_server_applies_at_once(keys: Keys, clock: Clock) -> None:
    authenticator = ApiKeyAuthenticator(keys, cache_seconds=5, clock=clock)
    token = keys.add()
    assert _reason(authenticator, token) == "OK"
    keys.revoke(token)
    authenticator.invalidate(token.split("_")[1])
    assert _reason(authenticator, token) == "API_KEY_REVOKED"


def test_a_wrong_secret_is_refused_even_for_a_cached_key(keys: Keys, clock: Clock) -> None:
    authenticator = ApiKeyAuthenticator(keys, cache_seconds=5, clock=clock)
    token = keys.add()
    assert _reason(authenticator, token) == "OK"
    assert _reason(authenticator, token[:-4] + "AAAA") == "API_KEY_INVALID"
    assert keys.lookups == 1


def test_an_unknown_key_id_is_remembered_for_a_second(keys: Keys, clock: Clock) -> None:
    authenticator = ApiKeyAuthenticator(keys, cache_seconds=5, clock=clock)
    unknown = "pgk_0123456789ab_secret"
    assert [_reason(authenticator, unknown) for _ in range(3)] == ["API_KEY_INVALID"] * 3
    assert keys.lookups == 1
    clock.now += 1.0
    assert _reason(authenticator, unknown) == "API_KEY_INVALID"
    assert keys.lookups == 2


def test_no_cache_time_asks_the_store_on_every_call(keys: Keys, clock: Clock) -> None:
    authenticator = ApiKeyAuthenticator(keys, cache_seconds=0, clock=clock)
    token = keys.add()
    assert [_reason(authenticator, token) for _ in range(3)] == ["OK"] * 3
    assert _reason(authenticator, "pgk_0123456789ab_secret") == "API_KEY_INVALID"
    assert keys.lookups == 4
