"""The console's session store (expiry, ending a key's sessions) and its latency percentiles."""

from __future__ import annotations

import math

import pytest

from posguard_server.console.live import quantile
from posguard_server.console.sessions import SessionStore
from posguard_server.domain.api_keys import Role


def test_a_session_ends_when_its_lifetime_is_over() -> None:
    now = [100.0]
    store = SessionStore(60, clock=lambda: now[0])
    token, session = store.create("k1", frozenset({Role.ADMIN}))
    assert store.get(token) is session
    now[0] = 159.9
    assert store.get(token) is session
    now[0] = 160.0
    assert store.get(token) is None
    assert len(store) == 0


def test_tokens_and_csrf_tokens_are_distinct_and_a_key_can_be_signed_out_everywhere() -> None:
    store = SessionStore(60)
    first, a = store.create("k1", frozenset({Role.ANALYST}))
    second, b = store.create("k1", frozenset({Role.ANALYST}))
    other, _ = store.create("k2", frozenset({Role.AUDITOR}))
    assert len({first, second, other, a.csrf, b.csrf}) == 5
    assert store.get("made-up") is None
    store.end_key("k1")
    assert store.get(first) is None
    assert store.get(second) is None
    assert store.get(other) is not None


def test_quantiles_interpolate_inside_buckets() -> None:
    buckets = {0.001: 0.0, 0.002: 50.0, 0.005: 90.0, 0.01: 100.0, math.inf: 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.002)
    assert quantile(0.25, buckets) == pytest.approx(0.0015)
    assert quantile(0.95, buckets) == pytest.approx(0.0075)
    assert quantile(0.5, {0.001: 0.0, math.inf: 0.0}) is None
    # Beyond the last finite bucket only its lower edge is known.
    assert quantile(0.99, {0.001: 1.0, math.inf: 10.0}) == pytest.approx(0.001)
