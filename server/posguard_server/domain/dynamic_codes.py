"""One-time dynamic codes on the server side: secrets at rest, and how a presented code is judged.

Codes themselves are computed by ``posguard.dynamic_codes`` (the client library), so the server and a
customer's device can never disagree about what a code is.
"""

from __future__ import annotations

import enum
import hmac
import re
from dataclasses import dataclass
from secrets import randbelow, token_bytes

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from posguard.dynamic_codes import (
    DIGITS,
    HANDLE_DIGITS,
    KEY_BYTES,
    PERIOD_SECONDS,
    totp_value,
)

# Steps either side of "now" a code is still accepted in: one step of clock skew on the device.
SKEW_STEPS = 1
# Steps before the accepted window in which a matching code is reported EXPIRED rather than UNKNOWN_CODE.
EXPIRED_STEPS = 10
_SEPARATORS = re.compile(r"[ \-]")
_CODE = re.compile(rf"[0-9]{{{DIGITS}}}")


class Reason(enum.Enum):
    """Why a code was or was not redeemed; the values are what the store keeps."""

    OK = "ok"
    MALFORMED = "malformed"
    EXPIRED = "expired"
    ALREADY_USED = "already_used"
    WRONG_CUSTOMER = "wrong_customer"
    NOT_ENROLLED = "not_enrolled"
    NUMBER_NOT_ACTIVE = "number_not_active"
    UNKNOWN_CODE = "unknown_code"


# A code that matches nothing (unknown or malformed) is a guess: it counts toward the caller's failure limit.
# An expired, already used or wrong customer's code is a real customer's mistake, not enumeration.
GUESSES = frozenset({Reason.UNKNOWN_CODE, Reason.MALFORMED})


class StepMatch(enum.Enum):
    """Where in time a code's TOTP value matched the enrolment's key."""

    VALID = "valid"  # now - 1, now or now + 1
    EXPIRED = "expired"  # one of the EXPIRED_STEPS steps before the valid window
    NONE = "none"


@dataclass(frozen=True, slots=True)
class PresentedCode:
    """A well-formed code split into the enrolment handle and the TOTP value."""

    handle: str
    totp: str


def new_handle() -> str:
    """A fresh random enrolment handle: 10 decimal digits, independent of the customer number."""
    return str(randbelow(10**HANDLE_DIGITS)).zfill(HANDLE_DIGITS)


def new_key() -> bytes:
    return token_bytes(KEY_BYTES)


def parse_code(text: str) -> PresentedCode | None:
    """The code as presented, with spaces and hyphens ignored; None unless it is 18 digits."""
    code = _SEPARATORS.sub("", text)
    if not _CODE.fullmatch(code):
        return None
    return PresentedCode(handle=code[:HANDLE_DIGITS], totp=code[HANDLE_DIGITS:])


def match_step(key: bytes, totp: str, now_step: int) -> tuple[StepMatch, int | None]:
    """The step whose value ``totp`` is, searched in the valid window first, then the expired one."""
    valid = range(now_step - SKEW_STEPS, now_step + SKEW_STEPS + 1)
    expired = range(now_step - SKEW_STEPS - EXPIRED_STEPS, now_step - SKEW_STEPS)
    for kind, steps in ((StepMatch.VALID, valid), (StepMatch.EXPIRED, expired)):
        for step in steps:
            # Constant-time comparison: timing must not reveal how many digits of a guess were right.
            if hmac.compare_digest(totp_value(key, step), totp):
                return kind, step
    return StepMatch.NONE, None


def decide(match: StepMatch, *, number_active: bool, customer_matches: bool, already_used: bool) -> Reason:
    """The answer to a redemption of a code whose handle names an enrolment.

    A code that matches no step is UNKNOWN_CODE before anything else: the handle alone is in every code of
    the enrolment, so it must not be enough to learn the customer's state or whom the code belongs to.
    """
    if match is StepMatch.NONE:
        return Reason.UNKNOWN_CODE
    if not number_active:
        return Reason.NUMBER_NOT_ACTIVE
    if not customer_matches:
        return Reason.WRONG_CUSTOMER
    if match is StepMatch.EXPIRED:
        return Reason.EXPIRED
    return Reason.ALREADY_USED if already_used else Reason.OK


def step_bounds(step: int) -> tuple[int, int]:
    """Start and end (exclusive) of a step, in Unix seconds."""
    return step * PERIOD_SECONDS, (step + 1) * PERIOD_SECONDS


class SecretCipher:
    """AES-256-GCM for enrolment keys, with a key derived from the number key of the same version.

    The customer id is the associated data, so a ciphertext copied to another customer's row no longer
    decrypts. HKDF with its own label keeps this key independent of the FF1 and holder-detail keys.
    """

    def __init__(self, keys: dict[int, bytes]) -> None:
        self._aead = {version: AESGCM(_derive(key)) for version, key in keys.items()}

    def encrypt(self, secret_key: bytes, customer_id: str, version: int) -> bytes:
        nonce = token_bytes(12)
        return nonce + self._aead[version].encrypt(nonce, secret_key, customer_id.encode())

    def decrypt(self, blob: bytes, customer_id: str, version: int) -> bytes:
        return self._aead[version].decrypt(blob[:12], blob[12:], customer_id.encode())


def _derive(key: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"posguard dynamic code secret v1"
    ).derive(key)
