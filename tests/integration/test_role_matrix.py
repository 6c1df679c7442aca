"""Every RPC of the contract × every caller, through one real server: the role matrix is what is enforced.

The RPC list comes from the proto descriptors, so a new RPC joins this table by itself (and fails here until
it is in ``ROLE_MATRIX``). That the matrix says what the .proto "Roles:" comments say is checked in
tests/unit/test_access.py. Each call sends the default request message (one for the streaming RPC): enough
for the interceptors to decide, and for an allowed call to reach its handler, which then answers or refuses
the empty input on its own terms.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor

import posguard
from posguard.v1 import admin_pb2, cases_pb2, customer_ids_pb2, policy_pb2, risk_pb2
from posguard_server.api.access import ROLE_MATRIX
from posguard_server.domain.api_keys import Role
from posguard_server.store.audit import SqlAuditStore

from .conftest import settings_for_test, start_server

if TYPE_CHECKING:
    from .conftest import RunningServer


def contract_methods() -> dict[str, MethodDescriptor]:
    """Full method path → descriptor, for every RPC of the posguard.v1 services."""
    methods: dict[str, MethodDescriptor] = {}
    for module in (customer_ids_pb2, risk_pb2, admin_pb2, cases_pb2, policy_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                methods[f"/{service.full_name}/{method.name}"] = method
    return methods


METHODS = contract_methods()

# Callers besides one key per role. A revoked ADMIN key would be allowed everything, so its refusal can only
# come from the revocation; a forged key names a real admin key id with a wrong secret.
NO_KEY, REVOKED, FORGED = "no key", "revoked admin key", "forged admin key"
CALLERS: tuple[Role | str, ...] = (*Role, NO_KEY, REVOKED, FORGED)
UNAUTHENTICATED_REASONS = {NO_KEY: "API_KEY_MISSING", REVOKED: "API_KEY_REVOKED", FORGED: "API_KEY_INVALID"}
# A handler that crashes on, or does not implement, a default request is a bug of its own, not "it ran".
HANDLER_FAILURES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNIMPLEMENTED}


def snake_case(rpc: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", rpc).lower()


@dataclass
class MatrixServer:
    running: RunningServer
    tokens: dict[Role | str, str | None]


@pytest.fixture(scope="module")
def matrix_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MatrixServer]:
    """One server for the whole table, with a token for every caller."""
    running = start_server(settings_for_test(tmp_path_factory.mktemp("role-matrix")))
    try:
        tokens: dict[Role | str, str | None] = {role: running.key(role) for role in Role}
        tokens[NO_KEY] = None
        with posguard.Client(running.target, api_key=tokens[Role.ADMIN], timeout=10) as admin:
            created = admin.create_api_key(name="to be revoked", role=admin_pb2.ROLE_ADMIN)
            with posguard.Client(running.target, api_key=created.token, timeout=10) as doomed:
                doomed.list_api_keys()  # works now, and puts the key in the server's auth cache
            admin.revoke_api_key(key_id=created.key.key_id, reason="role matrix test")
        tokens[REVOKED] = created.token
        admin_token = tokens[Role.ADMIN]
        assert admin_token is not None
        tokens[FORGED] = admin_token.rsplit("_", 1)[0] + "_" + "A" * 43
        yield MatrixServer(running, tokens)
    finally:
        running.stop()


def call(client: posguard.Client, method: MethodDescriptor) -> tuple[grpc.StatusCode, str]:
    """Call ``method`` with a default request: the status code it ended with and the ErrorInfo reason."""
    rpc = getattr(client, snake_case(method.name))
    request = message_factory.GetMessageClass(method.input_type)()
    try:
        if method.client_streaming:
            list(rpc([request]))
        else:
            rpc(request)
    except posguard.PosguardError as error:
        return error.code, error.reason
    return grpc.StatusCode.OK, ""


def test_the_table_covers_every_rpc_of_the_contract() -> None:
    assert len(METHODS) >= 30  # the descriptors were read at all
    assert set(METHODS) == set(ROLE_MATRIX)
    # Every RPC has a client method, so the table below can call it by name.
    assert all(callable(getattr(posguard.Client, snake_case(m.name), None)) for m in METHODS.values())


@pytest.mark.parametrize("caller", CALLERS, ids=lambda c: c.value if isinstance(c, Role) else c)
@pytest.mark.parametrize("path", sorted(METHODS), ids=lambda p: p.split(".", 1)[1])
def test_the_role_matrix_is_enforced(matrix_server: MatrixServer, path: str, caller: Role | str) -> None:
    running = matrix_server.running
    audit = SqlAuditStore(running.server.database)
    before = audit.head().sequence
    with posguard.Client(running.target, api_key=matrix_server.tokens[caller], timeout=10) as client:
        code, reason = call(client, METHODS[path])

    if isinstance(caller, str):
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_REASONS[caller])
    elif caller in ROLE_MATRIX[path]:
        assert code not in {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}, reason
        assert code not in HANDLER_FAILURES, reason
        return
    else:
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    # A refused call must not have reached the handler: nothing it could have changed was audited.
    assert audit.head().sequence == before
