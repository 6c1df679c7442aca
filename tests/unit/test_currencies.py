"""ISO 4217: every active code with its minor-unit exponent, and nothing withdrawn or made up."""

from __future__ import annotations

import re

import pytest

from posguard_server.domain.currencies import ISO_4217, is_active, is_money, minor_exponent


@pytest.mark.parametrize(
    ("code", "exponent"),
    [
        ("CNY", 2),
        ("USD", 2),
        ("EUR", 2),
        ("JPY", 0),
        ("KRW", 0),
        ("ISK", 0),
        ("XAF", 0),
        ("BHD", 3),
        ("KWD", 3),
        ("TND", 3),
        ("CLF", 4),
        ("UYW", 4),
        ("XCG", 2),
        ("ZWG", 2),
        ("SLE", 2),
        ("VED", 2),
    ],
)
def test_known_exponents(code: str, exponent: int) -> None:
    assert minor_exponent(code) == exponent
    assert is_active(code)
    assert is_money(code)


@pytest.mark.parametrize("code", ["XAU", "XAG", "XDR", "XTS", "XXX", "XBA"])
def test_units_without_a_minor_unit_are_listed_but_are_not_money(code: str) -> None:
    assert is_active(code)
    assert minor_exponent(code) is None
    assert not is_money(code)


@pytest.mark.parametrize(
    "code",
    # withdrawn (lev → euro 2026, kuna → euro 2023, old leone, guilder → XCG, Zimbabwe dollar → ZWG,
    # convertible peso, pre-redenomination codes), made up, wrong case or shape
    ["BGN", "HRK", "SLL", "ANG", "ZWL", "CUC", "MRO", "VEF", "RMB", "ABC", "usd", "Usd", "US", "USDD", ""],
)
def test_withdrawn_and_invented_codes_are_unknown(code: str) -> None:
    assert minor_exponent(code) is None
    assert not is_active(code)
    assert not is_money(code)


def test_the_table_is_well_formed() -> None:
    assert all(re.fullmatch(r"[A-Z]{3}", code) for code in ISO_4217)
    assert list(ISO_4217) == sorted(ISO_4217)
    assert all(exponent in (None, 0, 2, 3, 4) for exponent in ISO_4217.values())
    # List One holds about 180 codes: a sanity bound against a truncated table.
    assert 170 <= len(ISO_4217) <= 190
    with pytest.raises(TypeError):
        ISO_4217["XYZ"] = 2  # type: ignore[index]
