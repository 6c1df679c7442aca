"""posguard's Python client: the posguard.v1 contract (``posguard.v1``) and a client for it.

    import posguard
    with posguard.Client("127.0.0.1:50051", api_key="pgk_...") as client:
        answer = client.verify_customer_id(number="1564 2011 0212 3456 7890")

``posguard.aio.Client`` is the asyncio twin. Errors are :mod:`posguard.errors` exceptions.
"""

from posguard._channel import TLS
from posguard.client import Client
from posguard.dynamic_codes import dynamic_code
from posguard.errors import (
    AlreadyExistsError,
    ConflictError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    PosguardError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)

__version__ = "0.1.0"

__all__ = [
    "TLS",
    "AlreadyExistsError",
    "Client",
    "ConflictError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "PosguardError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "__version__",
    "dynamic_code",
]
