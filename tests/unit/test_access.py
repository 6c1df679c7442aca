"""The role matrix covers every RPC of the contract and says what the .proto comments tell API users."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from posguard.v1 import admin_pb2, cases_pb2, customer_ids_pb2, policy_pb2, risk_pb2
from posguard_server.api.access import ROLE_MATRIX, allowed_roles, is_public
from posguard_server.domain.api_keys import Role

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto" / "posguard" / "v1"
_RPC = re.compile(r"((?:[ \t]*//[^\n]*\n)+)[ \t]*rpc (\w+)\(")


def contract_methods() -> set[str]:
    methods = set()
    for module in (customer_ids_pb2, risk_pb2, admin_pb2, cases_pb2, policy_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            methods.update(f"/{service.full_name}/{m.name}" for m in service.methods)
    return methods


def documented_roles() -> dict[str, frozenset[Role]]:
    """RPC name → the roles named on the "Roles:" line of its comment."""
    found = {}
    for proto in PROTO_DIR.glob("*.proto"):
        for comment, rpc in _RPC.findall(proto.read_text()):
            line = next(ln for ln in comment.splitlines() if "Roles:" in ln)
            names = re.findall(
                r"\b(GATEWAY|ADMIN|AUDITOR|TRAINER|ANALYST)\b", line.split("Roles:", 1)[1].split("(")[0]
            )
            found[rpc] = frozenset(Role[name] for name in names)
    return found


def test_every_rpc_of_the_contract_is_in_the_matrix_and_nothing_else() -> None:
    assert set(ROLE_MATRIX) == contract_methods()
    assert all(ROLE_MATRIX.values()), "an RPC nobody may call"


def test_the_matrix_equals_the_roles_documented_in_the_protos() -> None:
    documented = documented_roles()
    assert {m.rsplit("/", 1)[1]: roles for m, roles in ROLE_MATRIX.items()} == documented


def test_admin_may_do_what_trainers_auditors_and_analysts_may() -> None:
    for method, roles in ROLE_MATRIX.items():
        if roles & {Role.TRAINER, Role.AUDITOR, Role.ANALYST}:
            assert Role.ADMIN in roles, method


def test_analysts_may_work_cases_and_nothing_else() -> None:
    analyst = {method for method, roles in ROLE_MATRIX.items() if Role.ANALYST in roles}
    cases = {f"/posguard.v1.Cases/{m.name}" for m in cases_pb2.DESCRIPTOR.services_by_name["Cases"].methods}
    assert analyst == cases
    assert len(cases) == 4


@pytest.mark.parametrize(
    "method",
    ["/grpc.health.v1.Health/Check", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"],
)
def test_health_and_reflection_are_public(method: str) -> None:
    assert is_public(method)


def test_unknown_methods_are_denied_to_everyone() -> None:
    assert not is_public("/posguard.v1.Admin/DropEverything")
    assert allowed_roles("/posguard.v1.Admin/DropEverything") == frozenset()
