"""The client's channel retries UNAVAILABLE for idempotent calls only, against a real gRPC server.

The server here is a stand-in Admin service that fails the first attempts on purpose: the only way to make a
real server answer UNAVAILABLE on cue.
"""

from __future__ import annotations

import time
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc
import pytest

import posguard
from posguard.v1 import admin_pb2, admin_pb2_grpc

if TYPE_CHECKING:
    from collections.abc import Iterator


class FlakyAdmin(admin_pb2_grpc.AdminServicer):
    """Answers UNAVAILABLE to the first ``failures`` attempts of each method, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: dict[str, int] = {}
        self.request_ids: list[str] = []

    def _attempt(self, name: str, context: grpc.ServicerContext) -> None:
        self.attempts[name] = self.attempts.get(name, 0) + 1
        if self.attempts[name] <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")

    def ListApiKeys(self, request: Any, context: grpc.ServicerContext) -> admin_pb2.ListApiKeysResponse:
        self._attempt("ListApiKeys", context)
        return admin_pb2.ListApiKeysResponse()

    def RevokeApiKey(self, request: Any, context: grpc.ServicerContext) -> admin_pb2.RevokeApiKeyResponse:
        self.request_ids.append(request.request_id)
        self._attempt("RevokeApiKey", context)
        return admin_pb2.RevokeApiKeyResponse(key=admin_pb2.ApiKey(key_id=request.key_id))

    def ListModels(self, request: Any, context: grpc.ServicerContext) -> admin_pb2.ListModelsResponse:
        time.sleep(2)
        return admin_pb2.ListModelsResponse()

    def CreateApiKey(self, request: Any, context: grpc.ServicerContext) -> admin_pb2.CreateApiKeyResponse:
        self._attempt("CreateApiKey", context)
        return admin_pb2.CreateApiKeyResponse()


@pytest.fixture
def flaky() -> Iterator[tuple[FlakyAdmin, str]]:
    servicer = FlakyAdmin(failures=2)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    admin_pb2_grpc.add_AdminServicer_to_server(servicer, server)  # type: ignore[arg-type]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_reads_are_retried_through_unavailable(flaky: tuple[FlakyAdmin, str]) -> None:
    servicer, target = flaky
    with posguard.Client(target) as client:
        client.list_api_keys()
    assert servicer.attempts["ListApiKeys"] == 3


def test_writes_are_retried_with_the_same_request_id(flaky: tuple[FlakyAdmin, str]) -> None:
    servicer, target = flaky
    with posguard.Client(target) as client:
        assert client.revoke_api_key(key_id="abc", reason="x").key.key_id == "abc"
    assert servicer.attempts["RevokeApiKey"] == 3
    assert len(set(servicer.request_ids)) == 1


def test_key_creation_is_not_retried(flaky: tuple[FlakyAdmin, str]) -> None:
    servicer, target = flaky
    with posguard.Client(target) as client, pytest.raises(posguard.UnavailableError):
        client.create_api_key(name="x", role=admin_pb2.ROLE_GATEWAY)
    assert servicer.attempts["CreateApiKey"] == 1


def test_retries_stop_after_the_policy_limit() -> None:
    servicer = FlakyAdmin(failures=10)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    admin_pb2_grpc.add_AdminServicer_to_server(servicer, server)  # type: ignore[arg-type]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with posguard.Client(f"127.0.0.1:{port}") as client, pytest.raises(posguard.UnavailableError):
            client.list_api_keys()
        assert servicer.attempts["ListApiKeys"] == 4
    finally:
        server.stop(0)


def test_every_call_carries_the_client_deadline(flaky: tuple[FlakyAdmin, str]) -> None:
    _, target = flaky
    started = time.monotonic()
    with posguard.Client(target, timeout=0.2) as client, pytest.raises(posguard.DeadlineExceededError):
        client.list_models()
    assert time.monotonic() - started < 1.5
