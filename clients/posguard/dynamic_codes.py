"""One-time dynamic payment codes, generated offline from the secret EnrollDynamicCodes returned.

    import posguard
    code = posguard.dynamic_code(secret)  # 18 digits, valid for the current 60-second step

The secret has the form ``pgd1.<handle>.<key>``: ``handle`` is 10 random decimal digits that name the
enrolment, ``key`` is 32 random bytes in Base32 without padding. A code is the handle followed by an 8-digit
TOTP value (RFC 6238 with HMAC-SHA256 and a 60-second step, RFC 4226 dynamic truncation).

The handle is random, so a code says nothing about the customer's number. All codes of one enrolment share
the handle, so they can be linked to each other; enrolling again (replace_existing) gives a new handle.

This module is the one definition of code generation: the server computes codes with it too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
import time
from datetime import datetime

PERIOD_SECONDS = 60
DIGITS = 18
HANDLE_DIGITS = 10
TOTP_DIGITS = DIGITS - HANDLE_DIGITS
KEY_BYTES = 32
SECRET_PREFIX = "pgd1"  # noqa: S105 - a format marker, not a credential


def parse_secret(secret: str) -> tuple[str, bytes]:
    """The ``(handle, key)`` inside a provisioning secret; ValueError if it is not one."""
    parts = secret.strip().split(".")
    if len(parts) != 3 or parts[0] != SECRET_PREFIX:
        raise ValueError("not a posguard dynamic code secret")
    handle, encoded = parts[1], parts[2].upper()
    if len(handle) != HANDLE_DIGITS or not (handle.isascii() and handle.isdigit()):
        raise ValueError("the secret's handle must be 10 digits")
    try:
        key = base64.b32decode(encoded + "=" * (-len(encoded) % 8))
    except (binascii.Error, ValueError):
        raise ValueError("the secret's key is not Base32") from None
    if len(key) != KEY_BYTES:
        raise ValueError("the secret's key must be 32 bytes")
    return handle, key


def format_secret(handle: str, key: bytes) -> str:
    """The provisioning secret for a handle and key; the inverse of :func:`parse_secret`."""
    return f"{SECRET_PREFIX}.{handle}.{base64.b32encode(key).decode('ascii').rstrip('=')}"


def time_step(at: datetime | float | None = None) -> int:
    """The step a moment falls in: whole periods since the Unix epoch (now if ``at`` is None)."""
    if at is None:
        seconds = time.time()
    elif isinstance(at, datetime):
        if at.tzinfo is None:
            # A naive time is ambiguous; guessing the zone would shift the step by hours.
            raise ValueError("at must be timezone-aware")
        seconds = at.timestamp()
    else:
        seconds = float(at)
    return int(seconds // PERIOD_SECONDS)


def totp_value(key: bytes, step: int) -> str:
    """The 8-digit value of a key at a step: HMAC-SHA256 over the step, RFC 4226 dynamic truncation."""
    digest = hmac.new(key, struct.pack(">Q", step), hashlib.sha256).digest()
    offset = digest[-1] & 0x0F
    binary = int.from_bytes(digest[offset : offset + 4], "big") & 0x7FFFFFFF
    return str(binary % 10**TOTP_DIGITS).zfill(TOTP_DIGITS)


def code_at_step(secret: str, step: int) -> str:
    """The 18-digit code of a secret at a step."""
    return code_of(*parse_secret(secret), step)


def code_of(handle: str, key: bytes, step: int) -> str:
    """The 18-digit code of an enrolment's handle and key at a step: the handle, then the TOTP value."""
    return handle + totp_value(key, step)


def dynamic_code(secret: str, at: datetime | float | None = None) -> str:
    """The code a secret gives at a moment (now if ``at`` is None)."""
    return code_at_step(secret, time_step(at))


__all__ = [
    "DIGITS",
    "PERIOD_SECONDS",
    "code_at_step",
    "code_of",
    "dynamic_code",
    "format_secret",
    "parse_secret",
    "time_step",
    "totp_value",
]
