"""The number scheme: layout, normalisation, parsing, typo detection, unique and orderless serials."""

from __future__ import annotations

import itertools
import random
import re

import numpy as np
import pytest

from posguard_server.domain.audit_report import one_keystroke_variants
from posguard_server.domain.check_digits import compute, symbols_to_digits
from posguard_server.domain.numbers import (
    CROCKFORD,
    DEFAULT_SCHEME,
    NumberError,
    NumberProblem,
    ParsedNumber,
    Scheme,
    SerialCipher,
    normalize,
    number_for,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))
DECIMAL = "0123456789"

BASE32 = Scheme(
    issuer="short", country="156", region="4201", institution="102", serial_length=6, alphabet="base32"
)
WITH_MERCHANT = Scheme(issuer="merchant", country="156", region="3101", institution="305", merchant_digits=4)
ELSEWHERE = Scheme(issuer="elsewhere", country="840", region="0600", institution="001")


def problem(scheme: Scheme, text: str) -> NumberProblem | None:
    try:
        scheme.parse(text)
    except NumberError as error:
        return error.reason
    return None


def issued(scheme: Scheme, count: int, merchant_part: str = "", key: bytes = KEY) -> list[str]:
    cipher = SerialCipher(scheme, key)
    prefix = scheme.prefix(merchant_part)
    return [number_for(scheme, cipher, counter, prefix) for counter in range(count)]


# The audit job's definition of a slip of the finger (tested on its own in test_customers_domain).
one_keystroke_errors = one_keystroke_variants


# --- layout ---------------------------------------------------------------------------------------------


def test_default_scheme_is_twenty_digits_in_five_groups() -> None:
    scheme = DEFAULT_SCHEME
    assert (scheme.country, scheme.region, scheme.institution) == ("156", "4201", "102")
    assert scheme.length == 20 == 3 + 4 + 3 + 8 + 2
    assert scheme.prefix() == "1564201102"
    number = issued(scheme, 1)[0]
    assert len(number) == 20
    assert number.isdigit()
    assert number.startswith("1564201102")
    # The check digits cover every digit before them, so a terminal can check with int(number) % 97.
    assert number[-2:] == compute(number[:-2])
    assert int(number) % 97 == 1
    shown = scheme.display(number)
    assert re.fullmatch(r"\d{4} \d{4} \d{4} \d{4} \d{4}", shown)
    assert shown.replace(" ", "") == number


def test_display_groups_follow_the_scheme() -> None:
    scheme = Scheme(issuer="x", country="156", region="4201", institution="102", group=5)
    assert scheme.display("12345678901234567890") == "12345 67890 12345 67890"
    assert BASE32.display("1564201102ABCDEF12") == "1564 2011 02AB CDEF 12"


def test_merchant_part_extends_the_prefix() -> None:
    assert WITH_MERCHANT.prefix("0042") == "15631013050042"
    assert WITH_MERCHANT.length == 3 + 4 + 3 + 4 + 8 + 2
    for bad in ["", "042", "00420", "00A2", "００４２"]:
        with pytest.raises(ValueError, match="merchant part"):
            WITH_MERCHANT.prefix(bad)
    with pytest.raises(ValueError, match="no merchant part"):
        DEFAULT_SCHEME.prefix("0042")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"issuer": ""}, "issuer"),
        ({"country": "15"}, "country"),
        ({"country": "1560"}, "country"),
        ({"country": 156}, "country"),
        ({"region": "42O1"}, "region"),
        ({"region": ""}, "region"),
        ({"institution": "1 2"}, "institution"),
        ({"merchant_digits": -1}, "merchant_digits"),
        ({"serial_length": 5}, "1,000,000"),
        ({"serial_length": 3, "alphabet": "base32"}, "1,000,000"),
        ({"serial_length": True}, "serial_length"),
        ({"alphabet": "hex"}, "alphabet"),
        ({"group": 0}, "group"),
    ],
)
def test_invalid_schemes_are_refused(changes: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"issuer": "x", "country": "156", "region": "4201", "institution": "102"}
    fields.update(changes)
    with pytest.raises(ValueError, match=message):
        Scheme(**fields)  # type: ignore[arg-type]


def test_smallest_allowed_domains() -> None:
    assert (
        Scheme(issuer="x", country="156", region="4201", institution="102", serial_length=6).capacity == 10**6
    )
    small32 = Scheme(
        issuer="x", country="156", region="4201", institution="102", serial_length=4, alphabet="base32"
    )
    assert small32.capacity == 32**4


# --- normalisation and parsing --------------------------------------------------------------------------


def test_normalisation_of_decimal_input() -> None:
    number = issued(DEFAULT_SCHEME, 3)[2]
    grouped = DEFAULT_SCHEME.display(number)
    for typed in [
        grouped,
        grouped.replace(" ", "-"),
        f"  {number[:10]} - {number[10:]}\t",
        number.translate(str.maketrans(DECIMAL, "０１２３４５６７８９")),  # full-width, from an IME
        grouped.replace(" ", "\u2013"),  # an en dash a phone put in
    ]:
        assert normalize(typed, "decimal") == number
        assert DEFAULT_SCHEME.parse(typed).number == number
    # Look-alike letters are a Base32 convenience only; in a decimal number they are simply wrong.
    assert problem(DEFAULT_SCHEME, "O" + number[1:]) is NumberProblem.MALFORMED
    assert problem(DEFAULT_SCHEME, number[:5] + "l" + number[6:]) is NumberProblem.MALFORMED


def test_normalisation_of_base32_input() -> None:
    assert normalize("1564-2011 02ab cdef", "base32") == "1564201102ABCDEF"
    assert normalize("il1o0", "base32") == "11100"
    assert normalize("IL1O0", "base32") == "11100"
    assert normalize("u", "base32") == "U"
    with pytest.raises(ValueError, match="alphabet"):
        normalize("123", "hex")

    numbers = issued(BASE32, 200)
    with_look_alikes = next(n for n in numbers if "1" in n[10:16] and "0" in n[10:16])
    typed = with_look_alikes.lower().replace("1", "l").replace("0", "o")
    parsed = BASE32.parse(BASE32.display(typed))
    assert parsed.number == with_look_alikes
    with_i = with_look_alikes.replace("1", "I")
    assert BASE32.parse(with_i).number == with_look_alikes


def test_u_is_not_a_base32_symbol() -> None:
    number = issued(BASE32, 1)[0]
    assert problem(BASE32, number[:12] + "U" + number[13:]) is NumberProblem.MALFORMED


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1564",
        "1564 2011 0230 1433 977",
        "1564 2011 0230 1433 97700",
        "1564 2011 02A0 1433 9770",
        "156420110230143397#0",
    ],
)
def test_malformed_input(text: str) -> None:
    assert problem(DEFAULT_SCHEME, text) is NumberProblem.MALFORMED


def test_parse_reasons() -> None:
    number = issued(DEFAULT_SCHEME, 1)[0]
    parsed = DEFAULT_SCHEME.parse(number)
    assert parsed == ParsedNumber(number=number, prefix="1564201102", serial=number[10:18], merchant_part="")

    wrong_check = number[:-1] + str((int(number[-1]) + 1) % 10)
    assert problem(DEFAULT_SCHEME, wrong_check) is NumberProblem.CHECK_DIGITS

    # Well formed with valid check digits, but from another country's issuer.
    foreign = issued(ELSEWHERE, 1)[0]
    assert len(foreign) == DEFAULT_SCHEME.length
    assert problem(DEFAULT_SCHEME, foreign) is NumberProblem.UNKNOWN_ISSUER
    assert problem(ELSEWHERE, foreign) is None

    with pytest.raises(NumberError) as caught:
        DEFAULT_SCHEME.parse(wrong_check)
    assert isinstance(caught.value, ValueError)
    assert number not in str(caught.value)


def test_base32_letters_in_the_prefix_are_not_this_issuer() -> None:
    body = "15642A1102" + "ABCDEF"
    number = BASE32.assemble("1564201102", "ABCDEF")
    assert problem(BASE32, number) is None
    forged = body + compute(symbols_to_digits(body, CROCKFORD))
    assert problem(BASE32, forged) is NumberProblem.UNKNOWN_ISSUER


def test_assemble_checks_its_parts() -> None:
    with pytest.raises(ValueError, match="prefix"):
        DEFAULT_SCHEME.assemble("1564201103", "12345678")
    with pytest.raises(ValueError, match="serial"):
        DEFAULT_SCHEME.assemble("1564201102", "1234567")
    with pytest.raises(ValueError, match="serial"):
        DEFAULT_SCHEME.assemble("1564201102", "1234567A")
    with pytest.raises(ValueError, match="serial"):
        BASE32.assemble("1564201102", "ABCDEU")


# --- round trips ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "merchant_part"), [(DEFAULT_SCHEME, ""), (BASE32, ""), (WITH_MERCHANT, "0042")]
)
def test_issue_parse_and_decrypt_round_trip(scheme: Scheme, merchant_part: str) -> None:
    cipher = SerialCipher(scheme, KEY)
    prefix = scheme.prefix(merchant_part)
    rng = random.Random(scheme.issuer)
    for counter in [0, 1, 2, scheme.capacity - 1, *rng.sample(range(scheme.capacity), 200)]:
        number = number_for(scheme, cipher, counter, prefix)
        assert len(number) == scheme.length
        assert set(number) <= set(scheme.symbols)
        parsed = scheme.parse(scheme.display(number).lower())
        assert parsed == ParsedNumber(number, prefix, number[len(prefix) : -2], merchant_part)
        assert cipher.counter(parsed.serial, parsed.prefix) == counter


def test_counter_must_fit_the_serial() -> None:
    cipher = SerialCipher(DEFAULT_SCHEME, KEY)
    prefix = DEFAULT_SCHEME.prefix()
    assert len(cipher.serial(10**8 - 1, prefix)) == 8
    for bad in [10**8, -1]:
        with pytest.raises(ValueError, match="counter"):
            cipher.serial(bad, prefix)
    with pytest.raises(ValueError, match="prefix"):
        cipher.serial(1, "1564201103")
    with pytest.raises(ValueError, match="serial"):
        cipher.counter("1234", prefix)
    with pytest.raises(ValueError, match="another scheme"):
        number_for(BASE32, cipher, 1, prefix)


def test_prefix_is_the_tweak() -> None:
    cipher = SerialCipher(WITH_MERCHANT, KEY)
    one = [cipher.serial(counter, WITH_MERCHANT.prefix("0001")) for counter in range(100)]
    two = [cipher.serial(counter, WITH_MERCHANT.prefix("0002")) for counter in range(100)]
    assert sum(a == b for a, b in zip(one, two, strict=True)) <= 1


def test_repr_shows_no_key() -> None:
    cipher = SerialCipher(DEFAULT_SCHEME, KEY)
    assert KEY.hex() not in repr(cipher)
    assert repr(KEY) not in repr(cipher)


# --- typo detection over issued numbers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "merchant_part"),
    [(DEFAULT_SCHEME, ""), (BASE32, ""), (WITH_MERCHANT, "0042")],
    ids=["decimal", "base32", "merchant"],
)
def test_every_single_keystroke_error_is_check_digits(scheme: Scheme, merchant_part: str) -> None:
    numbers = issued(scheme, 1000, merchant_part)
    tried = 0
    missed: list[tuple[str, str, NumberProblem | None]] = []
    for number in numbers:
        for variant in one_keystroke_errors(number, scheme.symbols):
            tried += 1
            try:
                scheme.parse(variant)
            except NumberError as error:
                if error.reason is NumberProblem.CHECK_DIGITS:
                    continue
                missed.append((number, variant, error.reason))
            else:
                missed.append((number, variant, None))
    assert not missed[:10]
    per_number = (scheme.radix - 1) * scheme.length
    assert tried > 1000 * per_number


# --- serials: unique and without order ------------------------------------------------------------------


def spearman(xs: list[int], ys: list[int]) -> float:
    def ranks(values: list[int]) -> list[int]:
        out = [0] * len(values)
        for rank, index in enumerate(sorted(range(len(values)), key=values.__getitem__)):
            out[index] = rank
        return out

    rx, ry = np.array(ranks(xs), dtype=float), np.array(ranks(ys), dtype=float)
    n = len(xs)
    return float(1 - 6 * np.sum((rx - ry) ** 2) / (n * (n**2 - 1)))


@pytest.mark.parametrize("scheme", [DEFAULT_SCHEME, BASE32], ids=["decimal", "base32"])
def test_consecutive_counters_give_unique_unordered_serials(scheme: Scheme) -> None:
    cipher = SerialCipher(scheme, KEY)
    prefix = scheme.prefix()
    counters = list(range(10_000))
    serials = [cipher.serial(counter, prefix) for counter in counters]
    assert len(set(serials)) == len(serials)
    values = [cipher.counter(serial, prefix) for serial in serials[:1000]]
    assert values == counters[:1000]

    as_numbers = [_value(serial, scheme.symbols) for serial in serials]
    rho = spearman(counters, as_numbers)
    assert abs(rho) <= 0.05, rho
    # Neighbouring counters land far apart: no run of serials in counter order.
    ascending = sum(a < b for a, b in itertools.pairwise(as_numbers))
    assert 0.45 < ascending / (len(serials) - 1) < 0.55


def _value(serial: str, symbols: str) -> int:
    value = 0
    for symbol in serial:
        value = value * len(symbols) + symbols.index(symbol)
    return value


def test_another_key_gives_other_serials() -> None:
    ours = issued(DEFAULT_SCHEME, 1000)
    theirs = issued(DEFAULT_SCHEME, 1000, key=OTHER_KEY)
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    assert same <= 1
