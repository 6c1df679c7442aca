"""ISO 7064 MOD 97-10: known values, and every single-keystroke error caught, in decimal and Base32."""

from __future__ import annotations

import random

import pytest

from posguard_server.domain.check_digits import compute, is_valid, symbols_to_digits
from posguard_server.domain.numbers import CROCKFORD

DECIMAL = "0123456789"


def iban_body(iban: str) -> str:
    """An IBAN rearranged for its MOD 97-10 check (ISO 13616): letters become 10-35, country code last."""
    rearranged = iban[4:] + iban[:2]
    return "".join(str(int(symbol, 36)) for symbol in rearranged)


@pytest.mark.parametrize(
    "iban",
    [
        "GB82WEST12345698765432",  # ISO 13616 / ECBS example
        "DE89370400440532013000",
        "FR1420041010050500013M02606",
        "NL91ABNA0417164300",
        "BE68539007547034",
    ],
)
def test_iban_check_digits_are_mod_97_10(iban: str) -> None:
    body = iban_body(iban)
    # IBANs put the check digits in front; moved to the end they are the ISO 7064 check of the rest.
    assert int(body + iban[2:4]) % 97 == 1
    assert compute(body) == iban[2:4]
    assert is_valid(body + iban[2:4])


@pytest.mark.parametrize(
    ("digits", "check"),
    [
        ("794", "44"),  # the ISO 7064 example: 79444 leaves remainder 1
        ("0", "98"),
        ("1", "95"),
        ("00000000000000000000", "98"),
        ("1564201102000000", "89"),
    ],
)
def test_known_values(digits: str, check: str) -> None:
    assert compute(digits) == check
    assert is_valid(digits + check)
    assert int(digits + check) % 97 == 1


def test_agrees_with_direct_remainder() -> None:
    rng = random.Random(97)
    for _ in range(2000):
        digits = "".join(rng.choice(DECIMAL) for _ in range(rng.randrange(1, 40)))
        check = compute(digits)
        assert len(check) == 2
        assert 2 <= int(check) <= 98
        assert int(digits + check) % 97 == 1
        assert (98 - int(digits) * 100 % 97) == int(check)


def test_only_the_canonical_check_is_valid() -> None:
    # "02" and "99" both leave remainder 1 for this body; only the computed rendering is accepted.
    body = next(b for b in (str(n) for n in range(1000)) if compute(b) == "02")
    assert int(body + "99") % 97 == 1
    assert is_valid(body + "02")
    assert not is_valid(body + "99")


@pytest.mark.parametrize("bad", ["", "12a", "１２３", "²3", " 12"])
def test_compute_refuses_non_digits(bad: str) -> None:
    with pytest.raises(ValueError, match="digits"):
        compute(bad)


@pytest.mark.parametrize("bad", ["", "1", "12", "12a45", "１２３45", "12 45"])
def test_is_valid_is_false_for_non_numbers(bad: str) -> None:
    assert not is_valid(bad)


def single_substitutions(text: str, alphabet: str) -> list[str]:
    return [
        text[:i] + other + text[i + 1 :]
        for i, symbol in enumerate(text)
        for other in alphabet
        if other != symbol
    ]


def adjacent_transpositions(text: str) -> list[str]:
    return [
        text[:i] + text[i + 1] + text[i] + text[i + 2 :]
        for i in range(len(text) - 1)
        if text[i] != text[i + 1]
    ]


def test_every_single_error_is_caught_in_decimal() -> None:
    rng = random.Random(1)
    checked = 0
    for _ in range(400):
        body = "".join(rng.choice(DECIMAL) for _ in range(rng.randrange(4, 30)))
        number = body + compute(body)
        for variant in single_substitutions(number, DECIMAL) + adjacent_transpositions(number):
            assert not is_valid(variant), (number, variant)
            checked += 1
    assert checked > 50_000


def base32_valid(text: str) -> bool:
    """The Base32 rule: symbols as two digits each, then two decimal check digits."""
    body, check = text[:-2], text[-2:]
    return check == compute(symbols_to_digits(body, CROCKFORD))


def test_every_single_error_is_caught_in_base32() -> None:
    rng = random.Random(32)
    checked = 0
    for _ in range(300):
        body = "".join(rng.choice(CROCKFORD) for _ in range(rng.randrange(4, 20)))
        number = body + compute(symbols_to_digits(body, CROCKFORD))
        assert base32_valid(number)
        for variant in single_substitutions(number, CROCKFORD) + adjacent_transpositions(number):
            assert not base32_valid(variant), (number, variant)
            checked += 1
    assert checked > 50_000


def test_one_digit_per_symbol_would_not_be_enough() -> None:
    # Why symbols are written as two digits: with the value mod 10, "A" (10) and "0" (0) would collide.
    body = "1564201102A1B2C3"
    swapped = body.replace("A", "0", 1)
    one_digit = "".join(str(CROCKFORD.index(symbol) % 10) for symbol in body)
    one_digit_swapped = "".join(str(CROCKFORD.index(symbol) % 10) for symbol in swapped)
    assert compute(one_digit) == compute(one_digit_swapped)
    assert compute(symbols_to_digits(body, CROCKFORD)) != compute(symbols_to_digits(swapped, CROCKFORD))


def test_symbols_to_digits() -> None:
    assert symbols_to_digits("09AZ", CROCKFORD) == "00091031"
    assert symbols_to_digits("", CROCKFORD) == ""
    assert symbols_to_digits("123", DECIMAL) == "010203"
    with pytest.raises(ValueError, match="outside the alphabet"):
        symbols_to_digits("U", CROCKFORD)
    with pytest.raises(ValueError, match="outside the alphabet"):
        symbols_to_digits("a", CROCKFORD)


@pytest.mark.parametrize("alphabet", ["", "A", "AAB", "".join(chr(0x100 + i) for i in range(98))])
def test_unusable_alphabets_are_refused(alphabet: str) -> None:
    with pytest.raises(ValueError, match="alphabet"):
        symbols_to_digits("A", alphabet)
