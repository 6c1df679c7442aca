"""The exceptions a posguard client raises: one small, fixed tree keyed by gRPC status code.

Each carries the status ``code``, the server's ``reason`` (``ErrorInfo.reason``, stable, for programs),
a ``message`` for people and, for bad input, the ``field_violations`` naming what was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


_DETAILS_KEY = "grpc-status-details-bin"


class PosguardError(Exception):
    """Base of every error a posguard call raises."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.metadata = metadata or {}
        self.field_violations = field_violations

    def __str__(self) -> str:
        text = f"{self.code.name}"
        if self.reason:
            text += f" ({self.reason})"
        text += f": {self.message}"
        if self.field_violations:
            text += "; " + "; ".join(f"{v.field}: {v.description}" for v in self.field_violations)
        return text


class InvalidArgumentError(PosguardError):
    """The request was wrong; ``field_violations`` say which fields and why. Do not retry unchanged."""


class UnauthenticatedError(PosguardError):
    """No API key, an unknown one, or a revoked one."""


class PermissionDeniedError(PosguardError):
    """The key's role may not call this RPC."""


class NotFoundError(PosguardError):
    pass


class AlreadyExistsError(PosguardError):
    pass


class FailedPreconditionError(PosguardError):
    """The request is valid but the current state forbids it (e.g. reactivating a revoked number)."""


class ConflictError(PosguardError):
    """ABORTED: a concurrent change won; retrying the whole operation may succeed."""


class ResourceExhaustedError(PosguardError):
    """The server is shedding load or a rate limit applies; back off before retrying."""


class UnavailableError(PosguardError):
    """The server or its database cannot be reached right now; safe to retry later."""


class DeadlineExceededError(PosguardError):
    pass


class UnimplementedError(PosguardError):
    pass


class InternalError(PosguardError):
    """The server failed; ``message`` holds a reference its operator can look up."""


_BY_CODE: dict[grpc.StatusCode, type[PosguardError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.CANCELLED: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
}


def _details(status: status_pb2.Status) -> tuple[str, dict[str, str], tuple[FieldViolation, ...]]:
    reason: str = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
    return reason, metadata, tuple(violations)


def from_status(code: grpc.StatusCode, message: str, status: status_pb2.Status | None) -> PosguardError:
    """The exception for a status and its rich details (if the server sent any)."""
    reason, metadata, violations = _details(status) if status is not None else ("", {}, ())
    cls = _BY_CODE.get(code, InternalError)
    return cls(message, code=code, reason=reason, metadata=metadata, field_violations=violations)


def from_rpc_error(error: grpc.RpcError) -> PosguardError:
    """Translate what grpc raised (sync ``RpcError`` or asyncio ``AioRpcError``) into the exception tree."""
    call: grpc.Call = error  # type: ignore[assignment]  # every RpcError raised by a call is also a Call
    code, message = call.code(), call.details() or ""
    status = None
    for key, value in call.trailing_metadata() or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            parsed = status_pb2.Status.FromString(value)
            # Details that disagree with the status line were not written by posguard: ignore them.
            status = parsed if parsed.code == code.value[0] else None
    return from_status(code, message, status)
