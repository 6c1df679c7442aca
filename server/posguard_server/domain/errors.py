"""Errors that carry their meaning; the API layer maps each kind to one gRPC status code.

Every message here is shown to the client as is, so it must be a sentence about the client's request:
never a secret, a holder detail, a full customer number, an SQL statement or a driver message.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar


class ErrorKind(enum.Enum):
    """The canonical outcome an error stands for; named after the gRPC codes it maps to."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One field of a request that is wrong, named by its path (e.g. ``transaction.amount.currency``)."""

    field: str
    description: str


class PosguardError(Exception):
    """Base of every error posguard raises on purpose.

    ``reason`` is a stable UPPER_SNAKE_CASE code a program can branch on (sent as ``ErrorInfo.reason``);
    ``metadata`` adds safe key/value context (sent as ``ErrorInfo.metadata``).
    """

    kind: ClassVar[ErrorKind] = ErrorKind.INTERNAL
    default_reason: ClassVar[str] = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(PosguardError):
    """The request itself is wrong; ``violations`` name each field at fault."""

    kind = ErrorKind.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        violations: Iterable[FieldViolation],
        *,
        message: str | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.violations = tuple(violations)
        if not self.violations:
            raise ValueError("InvalidArgument needs at least one field violation")
        if message is None:
            fields = ", ".join(v.field for v in self.violations)
            message = f"invalid request: {fields}"
        super().__init__(message, reason=reason, metadata=metadata)

    @classmethod
    def field(cls, field: str, description: str, *, reason: str | None = None) -> InvalidArgument:
        """One violation, the common case."""
        return cls([FieldViolation(field, description)], reason=reason)


class NotFound(PosguardError):
    kind = ErrorKind.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(PosguardError):
    kind = ErrorKind.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(PosguardError):
    """The request is well formed but the current state forbids it (e.g. an illegal transition)."""

    kind = ErrorKind.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(PosguardError):
    """A concurrency conflict the client may resolve by retrying the whole operation."""

    kind = ErrorKind.ABORTED
    default_reason = "ABORTED"


class PermissionDenied(PosguardError):
    kind = ErrorKind.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(PosguardError):
    kind = ErrorKind.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(PosguardError):
    kind = ErrorKind.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(PosguardError):
    """A dependency (the database) cannot be reached right now; the client may retry later."""

    kind = ErrorKind.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(PosguardError):
    kind = ErrorKind.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Unimplemented(PosguardError):
    kind = ErrorKind.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"
