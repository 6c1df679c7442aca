"""The role matrix: which role may call which RPC. The one place access is decided.

Methods missing here are denied to every key (deny by default); ``PUBLIC`` methods need no key, so generic
gRPC tools (health probes, reflection clients) work without credentials. The "Roles:" line of each RPC's
comment in the .proto files says the same for API users; a test keeps the two equal.
"""

from __future__ import annotations

from collections.abc import Mapping

from posguard.v1 import admin_pb2, cases_pb2, customer_ids_pb2, policy_pb2, risk_pb2
from posguard_server.domain.api_keys import Role

# The services of the contract, one definition for the server (registration, health, admission, the tests).
CONTRACT_MODULES = (customer_ids_pb2, risk_pb2, admin_pb2, cases_pb2, policy_pb2)
SERVICE_NAMES = tuple(
    service.full_name
    for module in CONTRACT_MODULES
    for service in module.DESCRIPTOR.services_by_name.values()
)

GATEWAY, ADMIN, AUDITOR, TRAINER, ANALYST = Role.GATEWAY, Role.ADMIN, Role.AUDITOR, Role.TRAINER, Role.ANALYST

PUBLIC_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)

_CUSTOMER_IDS = "/posguard.v1.CustomerIds/"
_RISK = "/posguard.v1.Risk/"
_ADMIN = "/posguard.v1.Admin/"
_CASES = "/posguard.v1.Cases/"
_POLICY = "/posguard.v1.Policy/"

ROLE_MATRIX: Mapping[str, frozenset[Role]] = {
    # Gateways issue and check numbers at the till; admins manage the lifecycle.
    _CUSTOMER_IDS + "IssueCustomerId": frozenset({GATEWAY, ADMIN}),
    _CUSTOMER_IDS + "VerifyCustomerId": frozenset({GATEWAY, ADMIN}),
    _CUSTOMER_IDS + "GetCustomer": frozenset({GATEWAY, ADMIN}),
    _CUSTOMER_IDS + "ListCustomers": frozenset({ADMIN}),
    _CUSTOMER_IDS + "SuspendCustomerId": frozenset({ADMIN}),
    _CUSTOMER_IDS + "ReactivateCustomerId": frozenset({ADMIN}),
    _CUSTOMER_IDS + "RevokeCustomerId": frozenset({ADMIN}),
    _CUSTOMER_IDS + "RotateCustomerId": frozenset({ADMIN}),
    _CUSTOMER_IDS + "IssueSubId": frozenset({GATEWAY, ADMIN}),
    _CUSTOMER_IDS + "LinkExternalId": frozenset({GATEWAY, ADMIN}),
    _CUSTOMER_IDS + "ResolveExternalId": frozenset({GATEWAY, ADMIN}),
    _CUSTOMER_IDS + "EnrollDynamicCodes": frozenset({GATEWAY, ADMIN}),
    _CUSTOMER_IDS + "IssueDynamicCode": frozenset({GATEWAY, ADMIN}),
    _CUSTOMER_IDS + "RedeemDynamicCode": frozenset({GATEWAY, ADMIN}),
    # Scoring is the gateway's hot path; outcomes come from gateways or back-office admins.
    _RISK + "ScoreTransaction": frozenset({GATEWAY}),
    _RISK + "ScoreTransactions": frozenset({GATEWAY}),
    _RISK + "ReportOutcome": frozenset({GATEWAY, ADMIN}),
    _RISK + "GetCustomerRiskProfile": frozenset({GATEWAY, ADMIN, TRAINER}),
    # Keys are the admin's; models the trainer's; the audit trail is read by auditors.
    _ADMIN + "CreateApiKey": frozenset({ADMIN}),
    _ADMIN + "ListApiKeys": frozenset({ADMIN}),
    _ADMIN + "RevokeApiKey": frozenset({ADMIN}),
    _ADMIN + "ListModels": frozenset({TRAINER, ADMIN}),
    _ADMIN + "PromoteModel": frozenset({TRAINER, ADMIN}),
    _ADMIN + "RollbackModel": frozenset({TRAINER, ADMIN}),
    _ADMIN + "ListAuditEvents": frozenset({AUDITOR, ADMIN}),
    _ADMIN + "VerifyAuditLog": frozenset({AUDITOR, ADMIN}),
    # Analysts work the review queue and nothing else; admins may too.
    _CASES + "ListCases": frozenset({ANALYST, ADMIN}),
    _CASES + "GetCase": frozenset({ANALYST, ADMIN}),
    _CASES + "AssignCase": frozenset({ANALYST, ADMIN}),
    _CASES + "ResolveCase": frozenset({ANALYST, ADMIN}),
    # Lists and rules decide payments: only admins change them; the data team reads and backtests them.
    _POLICY + "CreateList": frozenset({ADMIN}),
    _POLICY + "ListLists": frozenset({ADMIN, TRAINER}),
    _POLICY + "AddListEntry": frozenset({ADMIN}),
    _POLICY + "RemoveListEntry": frozenset({ADMIN}),
    _POLICY + "ListEntries": frozenset({ADMIN, TRAINER}),
    _POLICY + "CreateRule": frozenset({ADMIN}),
    _POLICY + "ActivateRule": frozenset({ADMIN}),
    _POLICY + "RetireRule": frozenset({ADMIN}),
    _POLICY + "ListRules": frozenset({ADMIN, TRAINER}),
    _POLICY + "BacktestRules": frozenset({ADMIN, TRAINER}),
}


def is_public(method: str) -> bool:
    return method.startswith(PUBLIC_PREFIXES)


def allowed_roles(method: str) -> frozenset[Role]:
    return ROLE_MATRIX.get(method, frozenset())
