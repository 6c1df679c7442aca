"""Counts in messages: "1 row", "2 rows"."""

from __future__ import annotations


def count(number: int, noun: str, plural: str = "") -> str:
    """``number`` and ``noun``, the noun in the plural (``noun + "s"`` unless given) unless it is one."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"
