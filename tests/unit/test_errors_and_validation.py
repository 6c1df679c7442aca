"""Domain errors map to one status each; validation names bad fields; page tokens are bound to queries."""

from __future__ import annotations

import base64

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from posguard_server.api.errors import STATUS_CODES, status_for
from posguard_server.api.validation import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, Checker, make_page_token
from posguard_server.domain.api_keys import generate_key, parse_token, secret_matches
from posguard_server.domain.errors import ErrorKind, FailedPrecondition, FieldViolation, InvalidArgument


def _rich(status: grpc.Status) -> status_pb2.Status:
    ((key, value),) = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    return status_pb2.Status.FromString(value)


def test_every_error_kind_has_a_status_code() -> None:
    assert set(STATUS_CODES) == set(ErrorKind)


def test_invalid_argument_carries_error_info_and_bad_request() -> None:
    error = InvalidArgument([FieldViolation("name", "is required"), FieldViolation("role", "is unknown")])
    status = status_for(error, "/posguard.v1.Admin/CreateApiKey")
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    rich = _rich(status)
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert rich.details[0].Unpack(info)
    assert rich.details[1].Unpack(bad)
    assert (info.reason, info.domain) == ("INVALID_ARGUMENT", "posguard.v1")
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("name", "is required"),
        ("role", "is unknown"),
    ]


def test_domain_errors_keep_their_reason_and_message() -> None:
    status = status_for(FailedPrecondition("number is revoked", reason="ILLEGAL_TRANSITION"), "/m")
    assert status.code == grpc.StatusCode.FAILED_PRECONDITION
    assert status.details == "number is revoked"
    info = error_details_pb2.ErrorInfo()
    _rich(status).details[0].Unpack(info)
    assert info.reason == "ILLEGAL_TRANSITION"


def test_unexpected_errors_hide_their_text() -> None:
    status = status_for(KeyError("SELECT secret FROM keys"), "/m")
    assert status.code == grpc.StatusCode.INTERNAL
    assert "SELECT" not in status.details
    assert "ref " in status.details


def test_checker_collects_all_violations() -> None:
    check = Checker()
    check.request_id("")
    check.text("x" * 11, "name", max_length=10)
    check.text("a\nb", "note", max_length=10)
    check.text("", "optional", max_length=10)
    with pytest.raises(InvalidArgument) as caught:
        check.done()
    assert [v.field for v in caught.value.violations] == ["request_id", "name", "note"]


def test_page_size_defaults_and_is_coerced_to_the_maximum() -> None:
    check = Checker()
    assert check.page_size(0) == DEFAULT_PAGE_SIZE
    assert check.page_size(MAX_PAGE_SIZE + 5) == MAX_PAGE_SIZE
    check.done()
    check.page_size(-1)
    assert [v.field for v in check.violations] == ["page_size"]


def test_page_tokens_round_trip_only_for_their_query() -> None:
    token = make_page_token(41, "keys:1:False")
    assert make_page_token(None, "q") == ""
    check = Checker()
    assert check.page_token(token, "keys:1:False") == 41
    assert check.page_token("", "anything") is None
    check.done()
    for bad, query in ((token, "keys:2:False"), ("%%%", "q"), (make_page_token(1, "q")[:-3], "q")):
        check = Checker()
        assert check.page_token(bad, query) is None
        assert [v.field for v in check.violations] == ["page_token"]


def _crafted(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


# Tokens a client could craft: decodable, but no token this server made.
CRAFTED_TOKENS = [
    _crafted(b'{"after":' + str(2**64).encode() + b',"q":"q"}'),  # beyond 64 bits: the database would refuse
    _crafted(b'{"after":-1,"q":"q"}'),
    _crafted(b'{"after":1e3,"q":"q"}'),
    _crafted(b"[" * 3000 + b"]" * 3000),  # nested past the JSON parser's recursion limit (and too long)
    _crafted(b"[" * 700 + b"]" * 700),  # nested, within the length bound
    _crafted(b'{"after":1,"q":"q","x":"' + b"a" * 5000 + b'"}'),  # longer than any token made here
    _crafted(b'"just a string"'),
    _crafted(b"\xff\xfe"),
]


def test_crafted_page_tokens_are_invalid_arguments_never_errors() -> None:
    for bad in CRAFTED_TOKENS:
        check = Checker()
        assert check.page_token(bad, "q") is None
        assert [v.field for v in check.violations] == ["page_token"]


def test_api_keys_parse_and_match_only_their_own_secret() -> None:
    key = generate_key()
    parsed = parse_token(key.token)
    assert parsed is not None
    key_id, secret = parsed
    assert key_id == key.key_id
    assert secret_matches(secret, key.secret_hash)
    assert not secret_matches(secret + "x", key.secret_hash)
    assert key.secret_hash != secret
    for bad in ("", "pgk_", "pgk_short_secret", "abc_0123456789ab_secret", f"pgk_{key.key_id}_"):
        assert parse_token(bad) is None
