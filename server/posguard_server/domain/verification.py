"""What a verification answers: one verdict per presented number, decided from what is stored."""

from __future__ import annotations

import enum

from posguard_server.domain.customers import CustomerNumber, NumberKind, NumberStatus
from posguard_server.domain.numbers import NumberProblem


class Verdict(enum.Enum):
    OK = "OK"
    SUSPENDED = "SUSPENDED"
    REVOKED = "REVOKED"
    ROTATED = "ROTATED"
    OUT_OF_SCOPE = "OUT_OF_SCOPE"
    NOT_FOUND = "NOT_FOUND"
    MALFORMED = "MALFORMED"
    UNKNOWN_ISSUER = "UNKNOWN_ISSUER"
    CHECK_DIGITS = "CHECK_DIGITS"


_BY_STATUS = {
    NumberStatus.ACTIVE: Verdict.OK,
    NumberStatus.SUSPENDED: Verdict.SUSPENDED,
    NumberStatus.REVOKED: Verdict.REVOKED,
    NumberStatus.ROTATED: Verdict.ROTATED,
}
BY_PROBLEM = {problem: Verdict(problem.value) for problem in NumberProblem}
# Not a number anyone was given: these count toward the caller's failure limit (enumeration). A suspended
# or revoked number is a real customer's, not a sign of guessing.
GUESSES = frozenset({Verdict.NOT_FOUND, *BY_PROBLEM.values()})


def verdict(
    number: CustomerNumber, primary: CustomerNumber | None, *, merchant_id: str, channel: str
) -> Verdict:
    """The verdict on a stored ``number``; a sub number's needs its customer's current ``primary``.

    A sub number is only as good as its customer's primary, and only inside its scope (merchant, channel).
    """
    found = _BY_STATUS[number.status]
    if number.kind is not NumberKind.SUB or found is not Verdict.OK:
        return found
    if primary is None:  # a sub number always has a primary; without one it verifies nothing
        return Verdict.NOT_FOUND
    found = _BY_STATUS[primary.status]
    outside = (number.scope_merchant_id and number.scope_merchant_id != merchant_id) or (
        number.scope_channel and number.scope_channel != channel
    )
    return Verdict.OUT_OF_SCOPE if found is Verdict.OK and outside else found
