"""The server end to end: a real server on 127.0.0.1:0 and the real client, over loopback."""

from __future__ import annotations

import asyncio
import stat
import time
import urllib.request
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import posguard
import posguard.aio
from posguard.v1 import admin_pb2, risk_pb2
from posguard_server.store.api_keys import SqlApiKeyStore

if TYPE_CHECKING:
    from collections.abc import Callable

    from .conftest import RunningServer


def test_health_is_serving_for_the_server_and_each_service(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "posguard.v1.CustomerIds", "posguard.v1.Risk", "posguard.v1.Admin"):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service


def test_reflection_lists_the_three_services(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answer = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
        names = {s.name for s in answer.list_services_response.service}
    assert {"posguard.v1.CustomerIds", "posguard.v1.Risk", "posguard.v1.Admin"} <= names
    assert "grpc.health.v1.Health" in names


def test_no_key_is_unauthenticated(server: RunningServer) -> None:
    with posguard.Client(server.target) as client, pytest.raises(posguard.UnauthenticatedError) as caught:
        client.list_api_keys()
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.reason == "API_KEY_MISSING"


@pytest.mark.parametrize(
    "make_token",
    [
        lambda good: "not-a-posguard-key",
        lambda good: good[:-4] + "AAAA",  # right key id, wrong secret
        lambda good: "pgk_000000000000_" + good.split("_", 2)[2],  # unknown key id
    ],
    ids=["garbage", "wrong-secret", "unknown-key-id"],
)
def test_bad_keys_are_unauthenticated_alike(server: RunningServer, make_token: Callable[[str], str]) -> None:
    token = make_token(server.key("admin"))
    with (
        posguard.Client(server.target, api_key=token) as client,
        pytest.raises(posguard.UnauthenticatedError) as caught,
    ):
        client.list_api_keys()
    assert caught.value.reason == "API_KEY_INVALID"
    assert token not in str(caught.value)


def test_gateway_key_on_admin_rpc_is_permission_denied(server: RunningServer) -> None:
    client = posguard.Client(server.target, api_key=server.key("gateway"))
    with client, pytest.raises(posguard.PermissionDeniedError) as caught:
        client.create_api_key(name="x", role=admin_pb2.ROLE_ADMIN)
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.reason == "ROLE_NOT_ALLOWED"


def test_malformed_request_is_invalid_argument_naming_each_field(server: RunningServer) -> None:
    with posguard.Client(server.target, api_key=server.key("admin")) as client:
        with pytest.raises(posguard.InvalidArgumentError) as caught:
            client.create_api_key(name="", role=admin_pb2.ROLE_UNSPECIFIED)
        error = caught.value
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.reason == "INVALID_ARGUMENT"
        assert {v.field for v in error.field_violations} == {"name", "role"}
        # nothing was created
        assert [k.name for k in client.list_api_keys().keys] == ["test admin"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"name": "x" * 101, "role": admin_pb2.ROLE_GATEWAY}, "name"),
        ({"name": "tab\there", "role": admin_pb2.ROLE_GATEWAY}, "name"),
        ({"name": "ok", "role": 99}, "role"),
        ({"name": "ok", "role": admin_pb2.ROLE_GATEWAY, "request_id": "r" * 129}, "request_id"),
        ({"name": "ok", "role": admin_pb2.ROLE_GATEWAY, "request_id": "caf\u00e9"}, "request_id"),
    ],
    ids=["name-too-long", "name-control-char", "unknown-role", "request-id-too-long", "request-id-not-ascii"],
)
def test_create_api_key_rejects_bad_fields(
    server: RunningServer, fields: dict[str, object], field: str
) -> None:
    with posguard.Client(server.target, api_key=server.key("admin")) as client:
        with pytest.raises(posguard.InvalidArgumentError) as caught:
            client.create_api_key(admin_pb2.CreateApiKeyRequest(**fields))  # type: ignore[arg-type]
        assert [v.field for v in caught.value.field_violations] == [field]
        assert len(client.list_api_keys().keys) == 1


def test_an_unknown_method_is_refused_and_the_server_stays_up(server: RunningServer) -> None:
    metadata = (("authorization", f"Bearer {server.key('admin')}"),)
    with grpc.insecure_channel(server.target) as channel:
        unknown = channel.unary_unary("/posguard.v1.Admin/NoSuchMethod")
        with pytest.raises(grpc.RpcError) as caught:
            unknown(b"", metadata=metadata, timeout=5)
        # Every posguard.v1 RPC is implemented now; a method no servicer has is gRPC's UNIMPLEMENTED.
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with posguard.Client(server.target, api_key=server.key("admin")) as client:
        assert list(client.list_models().models) == []
        with pytest.raises(posguard.FailedPreconditionError):
            client.rollback_model(scope=risk_pb2.MODEL_SCOPE_GLOBAL, reason="nothing is active yet")
    with grpc.insecure_channel(server.target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_key_lifecycle_through_the_admin_rpcs(server: RunningServer) -> None:
    with posguard.Client(server.target, api_key=server.key("admin")) as admin:
        created = admin.create_api_key(name="till 7", role=admin_pb2.ROLE_GATEWAY)
        assert created.token.startswith(f"pgk_{created.key.key_id}_")
        assert not created.replayed
        assert (
            created.key.created_by
            == SqlApiKeyStore(server.server.database)
            .list(role=None, include_revoked=False, limit=1, after=None)[0][0]
            .key_id
        )  # the admin key that made it

        with posguard.Client(server.target, api_key=created.token) as gateway:
            assert not gateway.verify_customer_id(number="1").valid  # authenticated and authorised

            revoked = admin.revoke_api_key(key_id=created.key.key_id, reason="till replaced")
            assert revoked.key.revoked
            assert revoked.key.revoke_reason == "till replaced"
            # The server that revoked it drops it from its auth cache at once.
            with pytest.raises(posguard.UnauthenticatedError) as caught:
                gateway.verify_customer_id(number="1")
            assert caught.value.reason == "API_KEY_REVOKED"

        listed = admin.list_api_keys(include_revoked=True)
        assert created.key.key_id in {k.key_id for k in listed.keys}
        assert created.key.key_id not in {k.key_id for k in admin.list_api_keys().keys}
        with pytest.raises(posguard.NotFoundError):
            admin.revoke_api_key(key_id="000000000000", reason="typo")


def test_create_api_key_is_idempotent_on_request_id(server: RunningServer) -> None:
    with posguard.Client(server.target, api_key=server.key("admin")) as admin:
        first = admin.create_api_key(request_id="req-1", name="till 8", role=admin_pb2.ROLE_GATEWAY)
        again = admin.create_api_key(request_id="req-1", name="till 8", role=admin_pb2.ROLE_GATEWAY)
        assert again.replayed
        assert again.token == ""
        assert again.key == first.key
        with pytest.raises(posguard.InvalidArgumentError) as caught:
            admin.create_api_key(request_id="req-1", name="till 9", role=admin_pb2.ROLE_GATEWAY)
        assert caught.value.reason == "IDEMPOTENCY_CONFLICT"
        assert [v.field for v in caught.value.field_violations] == ["request_id"]
        assert sum(k.name.startswith("till") for k in admin.list_api_keys().keys) == 1


def test_list_api_keys_pages_with_tokens_bound_to_the_query(server: RunningServer) -> None:
    with posguard.Client(server.target, api_key=server.key("admin")) as admin:
        made = [admin.create_api_key(name=f"k{i}", role=admin_pb2.ROLE_TRAINER).key.key_id for i in range(5)]
        seen: list[str] = []
        token = ""
        while True:
            page = admin.list_api_keys(page_size=2, page_token=token, role=admin_pb2.ROLE_TRAINER)
            assert len(page.keys) <= 2
            seen.extend(k.key_id for k in page.keys)
            token = page.next_page_token
            if not token:
                break
        assert seen == made
        first = admin.list_api_keys(page_size=2, role=admin_pb2.ROLE_TRAINER)
        for bad in ("garbage!", first.next_page_token[:-2]):
            with pytest.raises(posguard.InvalidArgumentError) as caught:
                admin.list_api_keys(page_size=2, page_token=bad, role=admin_pb2.ROLE_TRAINER)
            assert [v.field for v in caught.value.field_violations] == ["page_token"]
        with pytest.raises(posguard.InvalidArgumentError) as caught:  # a token of another query
            admin.list_api_keys(page_size=2, page_token=first.next_page_token, role=admin_pb2.ROLE_GATEWAY)
        with pytest.raises(posguard.InvalidArgumentError) as caught:
            admin.list_api_keys(page_size=-1)
        assert [v.field for v in caught.value.field_violations] == ["page_size"]


def test_an_unexpected_failure_is_internal_without_its_message(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    token = server.key("admin")

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("password=hunter2 at /srv/secret/path")

    # Fault injection: the one place a real part is replaced, to make the server fail on purpose.
    monkeypatch.setattr(SqlApiKeyStore, "list", explode)
    with (
        posguard.Client(server.target, api_key=token) as admin,
        pytest.raises(posguard.InternalError) as caught,
    ):
        admin.list_api_keys()
    assert caught.value.code == grpc.StatusCode.INTERNAL
    assert caught.value.reason == "INTERNAL"
    assert "hunter2" not in caught.value.message
    assert "Traceback" not in caught.value.message
    ref = caught.value.message.split("ref ")[1].split(")")[0]
    assert any(ref in record.getMessage() for record in caplog.records)


def test_metrics_count_calls_by_method_and_code(server: RunningServer) -> None:
    with posguard.Client(server.target, api_key=server.key("admin")) as admin:
        admin.list_api_keys()
        with pytest.raises(posguard.InvalidArgumentError):
            admin.list_api_keys(page_size=-1)
    assert server.server.metrics_port
    expected = [
        'posguard_rpc_calls_total{code="OK",method="/posguard.v1.Admin/ListApiKeys"} 1.0',
        'posguard_rpc_calls_total{code="INVALID_ARGUMENT",method="/posguard.v1.Admin/ListApiKeys"} 1.0',
        'posguard_rpc_latency_seconds_count{code="OK",method="/posguard.v1.Admin/ListApiKeys"} 1.0',
    ]
    # The status reaches the client a moment before the server's interceptor finishes counting the call.
    deadline = time.monotonic() + 5
    while True:
        url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        if all(line in text for line in expected) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for line in expected:
        assert line in text


def test_access_log_names_method_code_latency_and_caller_but_not_the_key(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    token = server.key("admin")
    with (
        caplog.at_level("INFO", logger="posguard_server.access"),
        posguard.Client(server.target, api_key=token) as c,
    ):
        c.list_api_keys()
    lines = [r.getMessage() for r in caplog.records if r.name == "posguard_server.access"]
    key_id = token.split("_")[1]
    assert any("/posguard.v1.Admin/ListApiKeys OK" in line and f"caller={key_id}" in line for line in lines)
    assert all(token.split("_", 2)[2] not in line for line in lines)


def test_asyncio_client_speaks_the_same_contract(server: RunningServer) -> None:
    async def scenario() -> tuple[str, str]:
        async with posguard.aio.Client(server.target, api_key=server.key("admin")) as admin:
            created = await admin.create_api_key(name="async", role=admin_pb2.ROLE_AUDITOR)
            try:
                await admin.create_api_key(name="", role=admin_pb2.ROLE_AUDITOR)
            except posguard.InvalidArgumentError as error:
                return created.key.name, error.field_violations[0].field
            raise AssertionError("expected INVALID_ARGUMENT")

    assert asyncio.run(scenario()) == ("async", "name")


def test_insecure_no_auth_lets_local_calls_through(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory(insecure_no_auth=True)
    with posguard.Client(running.target) as client:
        client.create_api_key(name="made without a key", role=admin_pb2.ROLE_GATEWAY)
        assert [k.name for k in client.list_api_keys().keys] == ["made without a key"]


@pytest.mark.empty_database  # made by the server itself, not copied by the test
def test_the_embedded_database_and_its_journal_are_owner_only(server: RunningServer) -> None:
    """Under a usual umask (022) SQLite would make them readable by everyone; they hold the audit log."""
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        client.issue_customer_id()  # a write: the WAL and its index exist while the server runs
    files = sorted(server.settings.data_dir.glob("*.db*"))
    assert {f.name.rsplit(".", 1)[-1] for f in files} >= {"db", "db-wal", "db-shm"}
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o600 for f in files}
