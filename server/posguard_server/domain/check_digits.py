"""ISO 7064 MOD 97-10 check digits: the typo catcher a terminal can run without a network call.

The two check digits make the whole number, read as a decimal integer, leave remainder 1 when divided by
97 (the same system IBANs use). Any single substitution or adjacent transposition changes that remainder:

* a substitution changes the value by ``delta * 10**k`` with ``0 < |delta| <= 9``;
* swapping neighbours ``a`` and ``b`` changes it by ``(a - b) * 9 * 10**k``;

and since 97 is prime and divides none of ``delta``, ``a - b``, 9 or 10, it divides neither change. Jump
transpositions (``(a - b) * 99 * 10**k``) and twin errors (``(a - b) * 11 * 10**k``) are caught the same way.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Final

_MODULUS: Final = 97
# Symbols become two decimal digits each, and a change of a symbol's value must stay below the modulus.
_MAX_SYMBOLS: Final = _MODULUS


def _is_digits(text: str) -> bool:
    # str.isdigit alone accepts superscripts and other scripts' digits, which int() may reject or misread.
    return text.isascii() and text.isdigit()


def compute(digits: str) -> str:
    """The two check digits (``"02"`` to ``"98"``) for a non-empty string of ASCII digits."""
    if not digits or not _is_digits(digits):
        raise ValueError("check digits are computed over a non-empty string of digits 0-9")
    return f"{98 - int(digits + '00') % _MODULUS:02d}"


def is_valid(digits_with_check: str) -> bool:
    """Whether the last two digits are the check digits of the rest.

    Stricter than ``int(s) % 97 == 1``, which also accepts "00", "01" and "99" in place of "97", "98" and
    "02": exactly one rendering of each number is valid.
    """
    if len(digits_with_check) < 3 or not _is_digits(digits_with_check):
        return False
    return compute(digits_with_check[:-2]) == digits_with_check[-2:]


@lru_cache(maxsize=16)
def _values(alphabet: str) -> dict[str, str]:
    if len(alphabet) < 2 or len(set(alphabet)) != len(alphabet):
        raise ValueError("an alphabet has at least two symbols, each once")
    if len(alphabet) > _MAX_SYMBOLS:
        raise ValueError(f"an alphabet checked with MOD 97-10 has at most {_MAX_SYMBOLS} symbols")
    return {symbol: f"{value:02d}" for value, symbol in enumerate(alphabet)}


def symbols_to_digits(text: str, alphabet: str) -> str:
    """Each symbol of ``text`` as its value in ``alphabet``, written as two decimal digits.

    This keeps MOD 97-10's guarantees for alphanumeric numbers (Crockford Base32). Each symbol becomes one
    base-100 digit of the checked integer, so a substitution changes it by ``delta * 100**k`` and an
    adjacent transposition by ``(a - b) * 99 * 100**k``. 97 is prime, so it divides such a change only if
    it divides one of the factors: it does not divide 99 or 100, and two different symbol values differ by
    1 to 96 (an alphabet has at most 97 symbols), never by a multiple of 97. Writing symbols as one digit
    each, or as ASCII codes, would lose this: values would collide mod 10, or differ by 97 or more.
    """
    values = _values(alphabet)
    try:
        return "".join(values[symbol] for symbol in text)
    except KeyError:
        raise ValueError("the text holds a symbol outside the alphabet") from None
