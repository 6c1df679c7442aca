"""Domain errors → gRPC status with ``google.rpc.Status`` details. The one error mapping of the service.

Every error carries an ``ErrorInfo`` (reason + domain); bad input also carries ``BadRequest`` field
violations. Unexpected exceptions become ``INTERNAL`` with a reference the operator finds in the log; their
text never reaches the client.
"""

from __future__ import annotations

import logging
import secrets

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from posguard_server.domain.errors import ErrorKind, InvalidArgument, PosguardError

log = logging.getLogger(__name__)

ERROR_DOMAIN = "posguard.v1"

STATUS_CODES: dict[ErrorKind, grpc.StatusCode] = {kind: grpc.StatusCode[kind.value] for kind in ErrorKind}


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def build_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    *,
    metadata: dict[str, str] | None = None,
    violations: tuple[tuple[str, str], ...] = (),
) -> grpc.Status:
    """A status whose trailing metadata carries the rich ``google.rpc.Status``."""
    details = [
        _pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata or {}))
    ]
    if violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                for field, description in violations
            ]
        )
        details.append(_pack(bad_request))
    proto = status_pb2.Status(code=code.value[0], message=message, details=details)
    status: grpc.Status = rpc_status.to_status(proto)
    return status


def status_for(error: BaseException, method: str) -> grpc.Status:
    """Map any exception raised by a handler to the status the client sees."""
    if isinstance(error, PosguardError):
        violations: tuple[tuple[str, str], ...] = ()
        if isinstance(error, InvalidArgument):
            violations = tuple((v.field, v.description) for v in error.violations)
        return build_status(
            STATUS_CODES[error.kind],
            error.message,
            error.reason,
            metadata=error.metadata,
            violations=violations,
        )
    if isinstance(error, NotImplementedError):
        # The generated base servicer raises this for RPCs a later release implements.
        return build_status(
            grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this server yet", "UNIMPLEMENTED"
        )
    ref = secrets.token_hex(6)
    log.error("unexpected error in %s (ref %s)", method, ref, exc_info=error)
    return build_status(
        grpc.StatusCode.INTERNAL,
        f"internal error (ref {ref}); the operator can find it in the server log",
        "INTERNAL",
    )
