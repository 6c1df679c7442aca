"""FF1 against the NIST SP 800-38G sample vectors, round trips, and the spec's constraints."""

from __future__ import annotations

import random

import pytest

from posguard_server.domain.ff1 import FF1, MIN_DOMAIN, min_length_for

DIGITS36 = "0123456789abcdefghijklmnopqrstuvwxyz"

KEY_128 = "2B7E151628AED2A6ABF7158809CF4F3C"
KEY_192 = KEY_128 + "EF4359D8D580AA4F"
KEY_256 = KEY_192 + "7F036D6F04FC6A94"
NO_TWEAK = ""
TWEAK_10 = "39383736353433323130"
TWEAK_11 = "3737373770717273373737"

# NIST SP 800-38G, FF1 examples ("FF1samples"), samples 1 to 9.
NIST_SAMPLES = [
    (1, KEY_128, 10, NO_TWEAK, "0123456789", "2433477484"),
    (2, KEY_128, 10, TWEAK_10, "0123456789", "6124200773"),
    (3, KEY_128, 36, TWEAK_11, "0123456789abcdefghi", "a9tv40mll9kdu509eum"),
    (4, KEY_192, 10, NO_TWEAK, "0123456789", "2830668132"),
    (5, KEY_192, 10, TWEAK_10, "0123456789", "2496655549"),
    (6, KEY_192, 36, TWEAK_11, "0123456789abcdefghi", "xbj3kv35jrawxv32ysr"),
    (7, KEY_256, 10, NO_TWEAK, "0123456789", "6657667009"),
    (8, KEY_256, 10, TWEAK_10, "0123456789", "1001623463"),
    (9, KEY_256, 36, TWEAK_11, "0123456789abcdefghi", "xs8a0azh2avyalyzuwd"),
]
SAMPLE_IDS = [f"sample-{sample[0]}" for sample in NIST_SAMPLES]


def numerals(text: str) -> list[int]:
    return [DIGITS36.index(symbol) for symbol in text]


def text(values: list[int]) -> str:
    return "".join(DIGITS36[value] for value in values)


@pytest.mark.parametrize(
    ("sample", "key", "radix", "tweak", "plaintext", "ciphertext"), NIST_SAMPLES, ids=SAMPLE_IDS
)
def test_encrypt_matches_nist_sample(
    sample: int, key: str, radix: int, tweak: str, plaintext: str, ciphertext: str
) -> None:
    ff1 = FF1(bytes.fromhex(key), radix)
    assert text(ff1.encrypt(numerals(plaintext), bytes.fromhex(tweak))) == ciphertext


@pytest.mark.parametrize(
    ("sample", "key", "radix", "tweak", "plaintext", "ciphertext"), NIST_SAMPLES, ids=SAMPLE_IDS
)
def test_decrypt_matches_nist_sample(
    sample: int, key: str, radix: int, tweak: str, plaintext: str, ciphertext: str
) -> None:
    ff1 = FF1(bytes.fromhex(key), radix)
    assert text(ff1.decrypt(numerals(ciphertext), bytes.fromhex(tweak))) == plaintext


@pytest.mark.parametrize("radix", [10, 32, 2, 36])
@pytest.mark.parametrize("key_size", [16, 24, 32])
def test_round_trips_across_lengths(radix: int, key_size: int) -> None:
    rng = random.Random(f"ff1-{radix}-{key_size}")
    ff1 = FF1(rng.randbytes(key_size), radix)
    # Odd and even lengths exercise u != v; long ones need more than one AES block of output (d > 16).
    for length in [*range(ff1.min_length, 25), 40, 64, 100]:
        for _ in range(4):
            plain = [rng.randrange(radix) for _ in range(length)]
            tweak = rng.randbytes(rng.randrange(0, 40))
            cipher = ff1.encrypt(plain, tweak)
            assert len(cipher) == length
            assert all(0 <= value < radix for value in cipher)
            assert ff1.decrypt(cipher, tweak) == plain


def test_distinct_inputs_never_collide() -> None:
    # The whole 2**20 domain would take too long; thousands of distinct inputs must still never collide.
    ff1 = FF1(bytes(16), 2)
    rng = random.Random(7)
    seen: dict[tuple[int, ...], tuple[int, ...]] = {}
    for value in rng.sample(range(2**20), 5000):
        plain = tuple(int(bit) for bit in f"{value:020b}")
        cipher = tuple(ff1.encrypt(plain, b"t"))
        assert cipher not in seen
        seen[cipher] = plain


def test_tweak_and_key_change_the_output() -> None:
    plain = [1, 2, 3, 4, 5, 6, 7, 8]
    ff1 = FF1(bytes(range(32)), 10)
    assert ff1.encrypt(plain, b"1564201102") != ff1.encrypt(plain, b"1564201103")
    assert FF1(bytes(range(1, 33)), 10).encrypt(plain, b"x") != ff1.encrypt(plain, b"x")


@pytest.mark.parametrize(("radix", "min_length"), [(10, 6), (32, 4), (36, 4), (2, 20), (16, 5)])
def test_minimum_length_keeps_the_domain_at_a_million(radix: int, min_length: int) -> None:
    assert min_length_for(radix) == min_length
    assert radix**min_length >= MIN_DOMAIN > radix ** (min_length - 1)
    ff1 = FF1(bytes(16), radix)
    with pytest.raises(ValueError, match="numerals"):
        ff1.encrypt([0] * (min_length - 1), b"")
    with pytest.raises(ValueError, match="numerals"):
        ff1.decrypt([0] * (min_length - 1), b"")
    assert len(ff1.encrypt([0] * min_length, b"")) == min_length


def test_maximum_length_is_enforced() -> None:
    ff1 = FF1(bytes(16), 10, max_length=12)
    assert len(ff1.encrypt([0] * 12, b"")) == 12
    with pytest.raises(ValueError, match="numerals"):
        ff1.encrypt([0] * 13, b"")
    with pytest.raises(ValueError, match="maximum length"):
        FF1(bytes(16), 10, max_length=5)
    with pytest.raises(ValueError, match="maximum length"):
        FF1(bytes(16), 10, max_length=2**32)


def test_tweak_length_is_bounded() -> None:
    ff1 = FF1(bytes(16), 10, max_tweak_length=8)
    ff1.encrypt([0] * 6, bytes(8))
    with pytest.raises(ValueError, match="tweak"):
        ff1.encrypt([0] * 6, bytes(9))
    with pytest.raises(ValueError, match="tweak"):
        ff1.decrypt([0] * 6, bytes(9))
    with pytest.raises(ValueError, match="tweak"):
        FF1(bytes(16), 10, max_tweak_length=2**32)


@pytest.mark.parametrize("radix", [0, 1, 37, 65536])
def test_radix_out_of_range_is_refused(radix: int) -> None:
    with pytest.raises(ValueError, match="radix"):
        FF1(bytes(16), radix)


@pytest.mark.parametrize("size", [0, 8, 15, 17, 31, 33, 64])
def test_only_aes_key_sizes_are_accepted(size: int) -> None:
    with pytest.raises(ValueError, match="16, 24 or 32"):
        FF1(bytes(size), 10)


@pytest.mark.parametrize("bad", [[0, 1, 2, 3, 4, 10], [0, 1, 2, 3, 4, -1]])
def test_numerals_outside_the_radix_are_refused(bad: list[int]) -> None:
    ff1 = FF1(bytes(16), 10)
    with pytest.raises(ValueError, match="numeral"):
        ff1.encrypt(bad, b"")
    with pytest.raises(ValueError, match="numeral"):
        ff1.decrypt(bad, b"")


def test_repr_shows_no_key() -> None:
    key = bytes.fromhex(KEY_128)
    shown = repr(FF1(key, 10))
    assert KEY_128.lower() not in shown.lower()
    assert "radix=10" in shown
