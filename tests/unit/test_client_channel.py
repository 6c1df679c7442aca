"""What the client does before a call: request building, request ids, retry policy, error decoding."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from posguard import errors
from posguard._channel import TLS, build_request, service_config
from posguard.v1 import admin_pb2, customer_ids_pb2


def test_keyword_fields_build_the_request_and_fill_a_request_id() -> None:
    request = build_request(
        admin_pb2.CreateApiKeyRequest, None, {"name": "till", "role": admin_pb2.ROLE_GATEWAY}
    )
    assert request.name == "till"
    assert len(request.request_id) == 32
    again = build_request(admin_pb2.CreateApiKeyRequest, None, {"name": "till"})
    assert again.request_id != request.request_id


def test_a_given_request_id_is_kept_and_read_only_requests_get_none() -> None:
    given = admin_pb2.CreateApiKeyRequest(request_id="mine", name="till")
    assert build_request(admin_pb2.CreateApiKeyRequest, given, {}).request_id == "mine"
    verify = build_request(customer_ids_pb2.VerifyCustomerIdRequest, None, {"number": "1"})
    assert "request_id" not in verify.DESCRIPTOR.fields_by_name


def test_message_and_fields_together_or_the_wrong_message_are_refused() -> None:
    with pytest.raises(TypeError):
        build_request(admin_pb2.CreateApiKeyRequest, admin_pb2.CreateApiKeyRequest(), {"name": "x"})
    with pytest.raises(TypeError):
        build_request(admin_pb2.CreateApiKeyRequest, admin_pb2.RevokeApiKeyRequest(), {})  # type: ignore[arg-type]


def test_retry_policy_retries_only_unavailable_and_never_key_creation_or_streams() -> None:
    config = json.loads(service_config())
    retrying, not_retrying = config["methodConfig"]
    assert retrying["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "retryPolicy" not in not_retrying
    assert {"service": "posguard.v1.Admin", "method": "CreateApiKey"} in not_retrying["name"]
    assert {"service": "posguard.v1.Risk", "method": "ScoreTransactions"} in not_retrying["name"]


def test_tls_needs_certificate_and_key_together() -> None:
    with pytest.raises(ValueError, match="together"):
        TLS(cert_file="client.pem")


def _packed(message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def test_rich_status_details_become_reason_and_field_violations() -> None:
    status = status_pb2.Status(
        code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
        message="invalid request: name",
        details=[
            _packed(error_details_pb2.ErrorInfo(reason="INVALID_ARGUMENT", domain="posguard.v1")),
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field="name", description="is required")
                    ]
                )
            ),
        ],
    )
    error = errors.from_status(grpc.StatusCode.INVALID_ARGUMENT, status.message, status)
    assert isinstance(error, errors.InvalidArgumentError)
    assert error.reason == "INVALID_ARGUMENT"
    assert error.field_violations == (errors.FieldViolation("name", "is required"),)
    assert str(error) == "INVALID_ARGUMENT (INVALID_ARGUMENT): invalid request: name; name: is required"


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, errors.UnauthenticatedError),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDeniedError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhaustedError),
        (grpc.StatusCode.UNAVAILABLE, errors.UnavailableError),
        (grpc.StatusCode.DATA_LOSS, errors.InternalError),
        (grpc.StatusCode.UNKNOWN, errors.InternalError),
    ],
)
def test_each_code_has_one_exception_class(code: grpc.StatusCode, cls: type[errors.PosguardError]) -> None:
    error = errors.from_status(code, "m", None)
    assert type(error) is cls
    assert error.code == code
