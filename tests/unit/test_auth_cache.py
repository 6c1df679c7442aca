"""The API key cache: a verified token is trusted for ``cache_seconds`` at most, an unknown key id 1 s; reads
of key ids with no row here are bounded."""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from posguard_server.api.auth import ApiKeyAuthenticator, Principal
from posguard_server.domain.api_keys import ApiKey, Role, generate_key
from posguard_server.domain.errors import ResourceExhausted, Unauthenticated

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


class GatedKeys(Keys):
    """Reads of key ids the store does not have wait for ``gate``: made-up ids that are slow to read."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.reading = 0

    def find_for_auth(self, key_id: str) -> tuple[ApiKey, str] | None:
        self.reading += 1
        if key_id not in self.rows:
            assert self.gate.wait(10)
        return super().find_for_auth(key_id)


def _made_up() -> list[tuple[str, str]]:
    return [("authorization", f"Bearer pgk_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}")]


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition was not met")


def test_reads_of_key_ids_without_a_row_are_bounded_and_keys_in_use_are_read_apart(clock: Clock) -> None:
    keys = GatedKeys()
    token = keys.add()
    authenticator = ApiKeyAuthenticator(keys, cache_seconds=5, lookup_limit=2, clock=clock)

    async def scenario() -> None:
        assert (await authenticator.authenticate([("authorization", f"Bearer {token}")])).key_id
        reads = [asyncio.ensure_future(authenticator.authenticate(_made_up())) for _ in range(2)]
        await _until(lambda: keys.reading == 3)  # the key in use, then the two made-up ids, waiting
        # A third made-up id is refused at once: no read, no thread.
        with pytest.raises(ResourceExhausted) as refused:
            await authenticator.authenticate(_made_up())
        assert refused.value.reason == "OVERLOADED"
        assert keys.reading == 3
        # The key in use is due for a re-read: it does not queue behind the made-up ids.
        clock.now += 5
        assert (await authenticator.authenticate([("authorization", f"Bearer {token}")])).key_id
        assert keys.reading == 4
        keys.gate.set()
        for read in reads:
            with pytest.raises(Unauthenticated):
                await read
        # The slots are free again.
        with pytest.raises(Unauthenticated):
            await authenticator.authenticate(_made_up())

    try:
        asyncio.run(scenario())
    finally:
        keys.gate.set()
        authenticator.close()


def test_concurrent_calls_with_one_key_share_one_read(clock: Clock) -> None:
    keys = GatedKeys()
    authenticator = ApiKeyAuthenticator(keys, cache_seconds=5, lookup_limit=1, clock=clock)
    unknown = [("authorization", "Bearer pgk_0123456789ab_secret")]

    async def scenario() -> list[BaseException | Principal]:
        calls = [asyncio.ensure_future(authenticator.authenticate(unknown)) for _ in range(5)]
        await _until(lambda: keys.reading == 1)
        keys.gate.set()
        return await asyncio.gather(*calls, return_exceptions=True)

    try:
        outcomes = asyncio.run(scenario())
    finally:
        keys.gate.set()
        authenticator.close()
    assert [type(outcome) for outcome in outcomes] == [Unauthenticated] * 5  # not OVERLOADED: one read
    assert keys.lookups == 1
