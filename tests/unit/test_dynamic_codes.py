"""Offline dynamic codes: the one definition the client library and the server share."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.exceptions import InvalidTag

import posguard
from posguard.dynamic_codes import (
    DIGITS,
    PERIOD_SECONDS,
    code_at_step,
    dynamic_code,
    format_secret,
    parse_secret,
    time_step,
)
from posguard_server.domain.dynamic_codes import (
    Reason,
    SecretCipher,
    StepMatch,
    decide,
    match_step,
    new_handle,
    new_key,
    parse_code,
)

KEY = bytes(range(32))
HANDLE = "0123456789"
SECRET = format_secret(HANDLE, KEY)
MOMENT = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


def reference_totp(key: bytes, step: int) -> str:
    """RFC 4226 section 5.3, written out independently, with SHA-256 and 8 digits."""
    mac = hmac.new(key, step.to_bytes(8, "big"), hashlib.sha256).digest()
    offset = mac[len(mac) - 1] & 0xF
    value = ((mac[offset] & 0x7F) << 24) | (mac[offset + 1] << 16) | (mac[offset + 2] << 8) | mac[offset + 3]
    return f"{value % 100_000_000:08d}"


def test_a_code_has_18_digits_and_starts_with_the_handle() -> None:
    code = dynamic_code(SECRET, MOMENT)
    assert len(code) == DIGITS == 18
    assert code.isdigit()
    assert code.startswith(HANDLE)
    assert posguard.dynamic_code is dynamic_code


def test_codes_are_deterministic_for_a_secret_and_a_time() -> None:
    assert dynamic_code(SECRET, MOMENT) == dynamic_code(SECRET, MOMENT.timestamp())
    other = format_secret(HANDLE, bytes(32))
    assert dynamic_code(other, MOMENT)[10:] != dynamic_code(SECRET, MOMENT)[10:]


def test_the_code_stays_the_same_across_a_step_and_changes_with_the_next() -> None:
    start = datetime.fromtimestamp(time_step(MOMENT) * PERIOD_SECONDS, UTC)
    codes = {dynamic_code(SECRET, start + timedelta(seconds=s)) for s in (0, 1, 30, 59.999)}
    assert len(codes) == 1
    later = [dynamic_code(SECRET, start + timedelta(minutes=m)) for m in range(1, 6)]
    assert len({*codes, *later}) == 6


def test_the_suffix_is_rfc_4226_truncation_of_hmac_sha256() -> None:
    for step in (0, 1, time_step(MOMENT), 2**40 + 7):
        assert code_at_step(SECRET, step) == HANDLE + reference_totp(KEY, step)
    # The zero padding keeps 8 digits even when the value is small.
    small = next(s for s in range(10_000) if reference_totp(KEY, s).startswith("0"))
    assert len(code_at_step(SECRET, small)) == 18


def test_the_step_is_whole_minutes_since_the_epoch() -> None:
    assert time_step(0) == 0
    assert time_step(59.9) == 0
    assert time_step(60) == 1
    assert time_step(MOMENT) == int(MOMENT.timestamp()) // 60
    with pytest.raises(ValueError, match="timezone"):
        time_step(datetime(2026, 1, 1))


def test_secrets_round_trip_and_malformed_ones_are_refused() -> None:
    assert parse_secret(SECRET) == (HANDLE, KEY)
    assert SECRET.startswith("pgd1.0123456789.")
    assert "=" not in SECRET
    assert base64.b32decode(SECRET.split(".")[2] + "====") == KEY
    for bad in ("", "pgd1", "pgd2.0123456789.AAAA", "pgd1.123.AAAA", "pgd1.0123456789.!!", SECRET[:-8]):
        with pytest.raises(ValueError, match="secret"):
            parse_secret(bad)


def test_handles_and_keys_are_random() -> None:
    handles = {new_handle() for _ in range(50)}
    assert len(handles) == 50
    assert all(len(h) == 10 and h.isdigit() for h in handles)
    assert len(new_key()) == 32
    assert new_key() != new_key()


def test_presented_codes_ignore_spaces_and_hyphens() -> None:
    code = dynamic_code(SECRET, MOMENT)
    parsed = parse_code(f"{code[:6]} {code[6:12]}-{code[12:]}")
    assert parsed is not None
    assert (parsed.handle, parsed.totp) == (code[:10], code[10:])
    for bad in ("", code[:-1], code + "1", "a" + code[1:], "١" * 18):
        assert parse_code(bad) is None


def test_the_accepted_window_is_one_step_either_side_then_ten_expired_steps() -> None:
    now = time_step(MOMENT)

    def at(offset: int) -> tuple[StepMatch, int | None]:
        return match_step(KEY, code_at_step(SECRET, now + offset)[10:], now)

    for offset in (-1, 0, 1):
        assert at(offset) == (StepMatch.VALID, now + offset)
    for offset in (-2, -11):
        assert at(offset) == (StepMatch.EXPIRED, now + offset)
    assert at(-12) == (StepMatch.NONE, None)
    assert at(2) == (StepMatch.NONE, None)


def test_decisions() -> None:
    ok = {"number_active": True, "customer_matches": True, "already_used": False}
    assert decide(StepMatch.VALID, **ok) is Reason.OK
    assert decide(StepMatch.VALID, **{**ok, "already_used": True}) is Reason.ALREADY_USED
    assert decide(StepMatch.EXPIRED, **ok) is Reason.EXPIRED
    assert decide(StepMatch.VALID, **{**ok, "number_active": False}) is Reason.NUMBER_NOT_ACTIVE
    assert decide(StepMatch.VALID, **{**ok, "customer_matches": False}) is Reason.WRONG_CUSTOMER
    # A forged value is not attributed, whatever the enrolment's state.
    assert decide(StepMatch.NONE, **{**ok, "number_active": False}) is Reason.UNKNOWN_CODE


def test_the_secret_cipher_binds_the_customer_and_the_key_version() -> None:
    cipher = SecretCipher({1: b"\x01" * 32, 2: b"\x02" * 32})
    blob = cipher.encrypt(KEY, "cus_a", 2)
    assert KEY not in blob
    assert cipher.decrypt(blob, "cus_a", 2) == KEY
    with pytest.raises(InvalidTag):
        cipher.decrypt(blob, "cus_b", 2)
    with pytest.raises(InvalidTag):
        cipher.decrypt(blob, "cus_a", 1)
