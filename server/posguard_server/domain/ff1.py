"""FF1 format-preserving encryption (NIST SP 800-38G), over AES, for radixes 2 to 36.

FF1 turns a string of ``n`` numerals in base ``radix`` into another string of ``n`` numerals in the same
base, and back; under one key and tweak it is a permutation of all such strings. That is what makes a
serial made from a counter both unique (a permutation never collides) and unguessable (without the key the
order of the serials says nothing about the order of the counters).

FF3 and FF3-1 are deliberately absent: the 2025 draft of SP 800-38G Rev. 1 withdraws them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

MIN_RADIX: Final = 2
MAX_RADIX: Final = 36
# SP 800-38G Rev. 1: small domains fall to message-recovery attacks, so every domain must hold a million.
MIN_DOMAIN: Final = 1_000_000
# The length and the tweak length enter the PRF input as 4-byte integers, which bounds both.
SPEC_MAX_LENGTH: Final = 2**32 - 1
SPEC_MAX_TWEAK_LENGTH: Final = 2**32 - 1

_ROUNDS: Final = 10
_BLOCK: Final = 16
_AES_KEY_SIZES: Final = (16, 24, 32)


def min_length_for(radix: int) -> int:
    """The shortest input FF1 accepts in ``radix``: radix**minlen >= 1,000,000 and minlen >= 2."""
    length = 2
    while radix**length < MIN_DOMAIN:
        length += 1
    return length


class FF1:
    """FF1 under one AES key (128, 192 or 256 bits) for one radix.

    Safe to share between threads: each call makes its own AES context.
    """

    def __init__(
        self,
        key: bytes,
        radix: int,
        *,
        max_length: int = SPEC_MAX_LENGTH,
        max_tweak_length: int = SPEC_MAX_TWEAK_LENGTH,
    ) -> None:
        if len(key) not in _AES_KEY_SIZES:
            raise ValueError(f"an FF1 key is 16, 24 or 32 bytes long, not {len(key)}")
        if isinstance(radix, bool) or not isinstance(radix, int) or not MIN_RADIX <= radix <= MAX_RADIX:
            raise ValueError(f"the radix must be an integer from {MIN_RADIX} to {MAX_RADIX}, not {radix!r}")
        min_length = min_length_for(radix)
        if not min_length <= max_length <= SPEC_MAX_LENGTH:
            raise ValueError(f"the maximum length must be from {min_length} to {SPEC_MAX_LENGTH}")
        if not 0 <= max_tweak_length <= SPEC_MAX_TWEAK_LENGTH:
            raise ValueError(f"the maximum tweak length must be from 0 to {SPEC_MAX_TWEAK_LENGTH}")
        # ECB on one block at a time is exactly the spec's CIPH_K; PRF (CBC-MAC) and the output
        # expansion are built from it below. No message is ever encrypted in ECB mode here.
        self._cipher = Cipher(algorithms.AES(bytes(key)), modes.ECB())  # noqa: S305
        self._radix = radix
        self._min_length = min_length
        self._max_length = max_length
        self._max_tweak_length = max_tweak_length

    def __repr__(self) -> str:
        return f"FF1(radix={self._radix}, lengths={self._min_length}..{self._max_length})"

    @property
    def radix(self) -> int:
        return self._radix

    @property
    def min_length(self) -> int:
        return self._min_length

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_tweak_length(self) -> int:
        return self._max_tweak_length

    def encrypt(self, numerals: Sequence[int], tweak: bytes) -> list[int]:
        return self._run(numerals, tweak, decrypt=False)

    def decrypt(self, numerals: Sequence[int], tweak: bytes) -> list[int]:
        return self._run(numerals, tweak, decrypt=True)

    def _check(self, numerals: Sequence[int], tweak: bytes) -> None:
        n = len(numerals)
        if not self._min_length <= n <= self._max_length:
            raise ValueError(
                f"FF1 in radix {self._radix} takes {self._min_length} to {self._max_length} numerals, not {n}"
            )
        for numeral in numerals:
            if isinstance(numeral, bool) or not isinstance(numeral, int) or not 0 <= numeral < self._radix:
                raise ValueError(f"every numeral must be an integer from 0 to {self._radix - 1}")
        if len(tweak) > self._max_tweak_length:
            raise ValueError(
                f"the tweak is {len(tweak)} bytes long; at most {self._max_tweak_length} allowed"
            )

    def _run(self, numerals: Sequence[int], tweak: bytes, *, decrypt: bool) -> list[int]:
        self._check(numerals, tweak)
        radix = self._radix
        tweak = bytes(tweak)
        n = len(numerals)
        t = len(tweak)
        u = n // 2
        v = n - u
        # b = ceil(ceil(v * log2(radix)) / 8), computed exactly: floats misround for powers of two.
        b = ((radix**v - 1).bit_length() + 7) // 8
        d = 4 * ((b + 3) // 4) + 4
        header = (
            bytes((1, 2, 1))
            + radix.to_bytes(3, "big")
            + bytes((10, u % 256))
            + n.to_bytes(4, "big")
            + t.to_bytes(4, "big")
        )
        q_head = tweak + bytes((-t - b - 1) % _BLOCK)
        modulus: dict[int, int] = {u: radix**u, v: radix**v}

        context = self._cipher.encryptor()
        # P is the same in every round, so the CBC-MAC state after it is computed once.
        after_header = context.update(header)

        def round_value(i: int, half: int) -> int:
            q = q_head + bytes((i,)) + half.to_bytes(b, "big")
            r = _cbc_mac(context, after_header, q)
            s = bytearray(r)
            for j in range(1, (d + _BLOCK - 1) // _BLOCK):
                s += context.update(_xor_int(r, j))
            return int.from_bytes(s[:d], "big")

        a = _number(numerals[:u], radix)
        c = _number(numerals[u:], radix)
        if not decrypt:
            for i in range(_ROUNDS):
                m = u if i % 2 == 0 else v
                a, c = c, (a + round_value(i, c)) % modulus[m]
        else:
            for i in reversed(range(_ROUNDS)):
                m = u if i % 2 == 0 else v
                a, c = (c - round_value(i, a)) % modulus[m], a
        context.finalize()
        return _numerals(a, radix, u) + _numerals(c, radix, v)


def _cbc_mac(context: CipherContext, state: bytes, message: bytes) -> bytes:
    """Continue the spec's PRF (CBC-MAC with a zero IV) from ``state`` over whole blocks of ``message``."""
    for start in range(0, len(message), _BLOCK):
        block = message[start : start + _BLOCK]
        mixed = int.from_bytes(state, "big") ^ int.from_bytes(block, "big")
        state = context.update(mixed.to_bytes(_BLOCK, "big"))
    return state


def _xor_int(block: bytes, value: int) -> bytes:
    return (int.from_bytes(block, "big") ^ value).to_bytes(_BLOCK, "big")


def _number(numerals: Sequence[int], radix: int) -> int:
    """NUM_radix: the numerals read most significant first."""
    value = 0
    for numeral in numerals:
        value = value * radix + numeral
    return value


def _numerals(value: int, radix: int, length: int) -> list[int]:
    """STR^length_radix: ``value`` as exactly ``length`` numerals, most significant first."""
    out = [0] * length
    for position in range(length - 1, -1, -1):
        value, out[position] = divmod(value, radix)
    return out
