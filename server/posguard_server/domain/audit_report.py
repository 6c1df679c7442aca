"""What the periodic audit job reports to operators about issued numbers (DESIGN: "audit job")."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime


def one_keystroke_variants(number: str, alphabet: str) -> Iterator[str]:
    """Every string one substitution or one adjacent transposition away from ``number``."""
    for i, symbol in enumerate(number):
        for other in alphabet:
            if other != symbol:
                yield number[:i] + other + number[i + 1 :]
    for i in range(len(number) - 1):
        if number[i] != number[i + 1]:
            yield number[:i] + number[i + 1] + number[i] + number[i + 2 :]


def close_pairs(numbers: Iterable[str], alphabet: str) -> list[tuple[str, str]]:
    """Pairs of issued numbers one keystroke apart, each pair once (sorted).

    The check digits make such pairs impossible for a correct issuer, so any pair found means numbers were
    made outside the scheme or the data was altered; a set lookup per variant keeps this linear in count.
    """
    issued = set(numbers)
    pairs = {
        tuple(sorted((number, variant)))
        for number in issued
        for variant in one_keystroke_variants(number, alphabet)
        if variant in issued
    }
    return sorted((a, b) for a, b in pairs)


@dataclass(frozen=True, slots=True)
class NumberActivity:
    number: str
    status: str
    verifications: int
    failed_verifications: int
    issued_at: datetime
    last_verified_at: datetime | None


@dataclass(frozen=True, slots=True)
class AuditReport:
    generated_at: datetime
    numbers_checked: int
    duplicates: list[tuple[str, int]] = field(default_factory=list)
    one_keystroke_apart: list[tuple[str, str]] = field(default_factory=list)
    most_verified: list[NumberActivity] = field(default_factory=list)
    most_failed: list[NumberActivity] = field(default_factory=list)
    failing_callers: list[tuple[str, int]] = field(default_factory=list)
    # Keys refused for too many failures (enumeration defence): key id, times refused, last time.
    refused_callers: list[tuple[str, int, datetime]] = field(default_factory=list)
    dormant: list[NumberActivity] = field(default_factory=list)
