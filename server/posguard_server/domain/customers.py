"""Customers and their numbers: the plain objects, the lifecycle state machine and holder encryption."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from datetime import datetime
from secrets import token_bytes

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from posguard_server.domain.errors import FailedPrecondition


class NumberStatus(enum.Enum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    REVOKED = "revoked"
    ROTATED = "rotated"


class NumberKind(enum.Enum):
    STATIC = "static"
    SUB = "sub"


class Transition(enum.Enum):
    """What an operator can do to a number; ``rotate`` also issues a successor."""

    SUSPEND = "suspend"
    REACTIVATE = "reactivate"
    REVOKE = "revoke"
    ROTATE = "rotate"


# The whole lifecycle in one table: (from, action) → to. Anything missing is an illegal transition.
# REVOKED and ROTATED are final: a rotated number lives on only as a pointer to its successor.
LIFECYCLE: dict[tuple[NumberStatus, Transition], NumberStatus] = {
    (NumberStatus.ACTIVE, Transition.SUSPEND): NumberStatus.SUSPENDED,
    (NumberStatus.SUSPENDED, Transition.REACTIVATE): NumberStatus.ACTIVE,
    (NumberStatus.ACTIVE, Transition.REVOKE): NumberStatus.REVOKED,
    (NumberStatus.SUSPENDED, Transition.REVOKE): NumberStatus.REVOKED,
    (NumberStatus.ACTIVE, Transition.ROTATE): NumberStatus.ROTATED,
    (NumberStatus.SUSPENDED, Transition.ROTATE): NumberStatus.ROTATED,
}


def next_status(current: NumberStatus, action: Transition) -> NumberStatus:
    """The status after ``action``, or ``FailedPrecondition`` naming both when the lifecycle forbids it."""
    target = LIFECYCLE.get((current, action))
    if target is None:
        raise FailedPrecondition(
            f"cannot {action.value} a number that is {current.value}",
            reason="ILLEGAL_TRANSITION",
            metadata={"status": current.value, "action": action.value},
        )
    return target


@dataclass(frozen=True, slots=True)
class ExternalRef:
    namespace: str
    value: str


@dataclass(frozen=True, slots=True)
class Holder:
    """The person behind a customer. Encrypted at rest, never logged (``repr`` hides it)."""

    name: str = field(default="", repr=False)
    phone: str = field(default="", repr=False)

    def __bool__(self) -> bool:
        return bool(self.name or self.phone)


@dataclass(frozen=True, slots=True)
class CustomerNumber:
    number: str
    kind: NumberKind
    status: NumberStatus
    issuer: str
    key_version: int
    issued_at: datetime
    status_changed_at: datetime
    status_reason: str = ""
    successor_number: str = ""
    primary_number: str = ""
    scope_merchant_id: str = ""
    scope_channel: str = ""
    label: str = ""


@dataclass(frozen=True, slots=True)
class Customer:
    customer_id: str
    primary: CustomerNumber
    created_at: datetime
    updated_at: datetime
    sub_numbers: tuple[CustomerNumber, ...] = ()
    external_ids: tuple[ExternalRef, ...] = ()
    holder: Holder | None = None
    dynamic_codes_enrolled: bool = False


def mask(number: str) -> str:
    """How logs and audit entries show a number: enough to tell numbers apart, not enough to use one."""
    if len(number) <= 8:
        return "*" * len(number)
    return f"{number[:4]}{'*' * (len(number) - 8)}{number[-4:]}"


class HolderCipher:
    """AES-256-GCM for holder details, with a key derived from the number key of the same version.

    The customer id is the associated data, so a ciphertext moved to another row no longer decrypts.
    Deriving (HKDF) instead of reusing keeps the FF1 key and the encryption key independent.
    """

    def __init__(self, keys: dict[int, bytes]) -> None:
        self._aead = {version: AESGCM(_derive(key)) for version, key in keys.items()}

    def encrypt(self, holder: Holder, customer_id: str, version: int) -> bytes:
        nonce = token_bytes(12)
        plain = json.dumps({"name": holder.name, "phone": holder.phone}, separators=(",", ":")).encode()
        return nonce + self._aead[version].encrypt(nonce, plain, customer_id.encode())

    def decrypt(self, blob: bytes, customer_id: str, version: int) -> Holder:
        plain = self._aead[version].decrypt(blob[:12], blob[12:], customer_id.encode())
        data = json.loads(plain)
        return Holder(name=str(data["name"]), phone=str(data["phone"]))


def _derive(key: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"posguard holder details v1").derive(
        key
    )
