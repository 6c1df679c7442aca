"""Issuers and keys together: which scheme a number belongs to, and how the next number is made.

One ``Numbering`` per server. Numbers are made with the key ring's current version; the version is stored
with each number, so a key rotation never invalidates numbers already issued (verification is a lookup).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from posguard_server.domain.errors import FailedPrecondition
from posguard_server.domain.keyring import KeyRing
from posguard_server.domain.numbers import NumberError, NumberProblem, ParsedNumber, Scheme, SerialCipher

# How telling a problem is to the person at the till, least first (see ``Numbering.recognise``).
_TELLING = {NumberProblem.MALFORMED: 0, NumberProblem.UNKNOWN_ISSUER: 1, NumberProblem.CHECK_DIGITS: 2}


class Recognised(NamedTuple):
    """A presented number matched to its scheme, or the problem that stopped it.

    Made on every verification: a NamedTuple for the reason ``ParsedNumber`` is one.
    """

    scheme: Scheme | None
    parsed: ParsedNumber | None
    problem: NumberProblem | None


class Numbering:
    def __init__(self, schemes: Iterable[Scheme], keys: KeyRing, *, default_issuer: str) -> None:
        self.schemes = {scheme.issuer: scheme for scheme in schemes}
        if default_issuer not in self.schemes:
            raise ValueError(f"the default issuer {default_issuer!r} is not configured")
        self.default_issuer = default_issuer
        self.keys = keys
        self._ciphers = {
            (issuer, version): SerialCipher(scheme, keys.key(version))
            for issuer, scheme in self.schemes.items()
            for version in keys.keys
        }

    def scheme(self, issuer: str = "") -> Scheme | None:
        return self.schemes.get(issuer or self.default_issuer)

    def make_number(self, scheme: Scheme, prefix: str, counter: int) -> tuple[str, int]:
        """The number for a prefix's counter value under the current key, and that key's version.

        Raises ``FailedPrecondition`` (SERIAL_SPACE_USED_UP) once the prefix's counters pass the scheme's
        capacity: every number of that prefix has been issued.
        """
        if counter >= scheme.capacity:
            raise FailedPrecondition(
                "the issuer's serial space for this prefix is used up", reason="SERIAL_SPACE_USED_UP"
            )
        version = self.keys.current
        serial = self._ciphers[(scheme.issuer, version)].serial(counter, prefix)
        return scheme.assemble(prefix, serial), version

    def recognise(self, text: str) -> Recognised:
        """Match a presented number to a scheme: the first that parses it, else the most telling problem.

        CHECK_DIGITS outranks UNKNOWN_ISSUER, which outranks MALFORMED: a typo in a number of a known
        scheme is worth telling the person at the till.
        """
        worst: tuple[Scheme | None, NumberProblem] = (None, NumberProblem.MALFORMED)
        for scheme in self.schemes.values():
            try:
                return Recognised(scheme, scheme.parse(text), None)
            except NumberError as error:
                if _TELLING[error.reason] > _TELLING[worst[1]]:
                    worst = (scheme, error.reason)
        return Recognised(worst[0], None, worst[1])
