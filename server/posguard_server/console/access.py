"""Which RPC each page and action of the console stands for; the RPCs' role matrix decides who may use it.

The console has no role table of its own: a page or action is allowed to a key exactly when the RPC it
corresponds to is (``api.access.allowed_roles``). Only the overview stands for no RPC: every key that may
sign in sees it, and the parts of it that read the registry only with ListModels.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from posguard_server.api.access import allowed_roles
from posguard_server.domain.api_keys import Role

# The roles that may sign in: people's roles. Gateway keys belong to machines and have no page here.
CONSOLE_ROLES = frozenset({Role.ADMIN, Role.AUDITOR, Role.TRAINER, Role.ANALYST})
# The "RPC" of pages that every signed-in key may see.
SIGNED_IN = ""


def _rpc(service: str, method: str) -> str:
    return f"/posguard.v1.{service}/{method}"


GET_CUSTOMER = _rpc("CustomerIds", "GetCustomer")
SUSPEND = _rpc("CustomerIds", "SuspendCustomerId")
REACTIVATE = _rpc("CustomerIds", "ReactivateCustomerId")
REVOKE = _rpc("CustomerIds", "RevokeCustomerId")
ROTATE = _rpc("CustomerIds", "RotateCustomerId")
LIST_CASES = _rpc("Cases", "ListCases")
GET_CASE = _rpc("Cases", "GetCase")
ASSIGN_CASE = _rpc("Cases", "AssignCase")
RESOLVE_CASE = _rpc("Cases", "ResolveCase")
LIST_MODELS = _rpc("Admin", "ListModels")
PROMOTE_MODEL = _rpc("Admin", "PromoteModel")
ROLLBACK_MODEL = _rpc("Admin", "RollbackModel")
LIST_AUDIT = _rpc("Admin", "ListAuditEvents")
VERIFY_AUDIT = _rpc("Admin", "VerifyAuditLog")
LIST_LISTS = _rpc("Policy", "ListLists")
LIST_ENTRIES = _rpc("Policy", "ListEntries")
CREATE_LIST = _rpc("Policy", "CreateList")
ADD_LIST_ENTRY = _rpc("Policy", "AddListEntry")
REMOVE_LIST_ENTRY = _rpc("Policy", "RemoveListEntry")
LIST_RULES = _rpc("Policy", "ListRules")
CREATE_RULE = _rpc("Policy", "CreateRule")
ACTIVATE_RULE = _rpc("Policy", "ActivateRule")
RETIRE_RULE = _rpc("Policy", "RetireRule")
BACKTEST_RULES = _rpc("Policy", "BacktestRules")


def permitted(roles: Collection[Role], rpc: str) -> bool:
    """Whether a key with ``roles`` may use the page or action that stands for ``rpc``."""
    if not CONSOLE_ROLES.intersection(roles):
        return False
    if rpc == SIGNED_IN:
        return True
    return bool(allowed_roles(rpc).intersection(roles))


@dataclass(frozen=True, slots=True)
class NavEntry:
    label: str
    path: str
    rpc: str
    key: str  # the access key (Alt+Shift+key in most browsers)


NAV: tuple[NavEntry, ...] = (
    NavEntry("Overview", "/overview", SIGNED_IN, "o"),
    NavEntry("Numbers", "/numbers", GET_CUSTOMER, "n"),
    NavEntry("Number watch", "/watch", LIST_CASES, "w"),
    NavEntry("Review queue", "/cases", LIST_CASES, "q"),
    NavEntry("Lists and rules", "/policy", LIST_LISTS, "l"),
    NavEntry("Models", "/models", LIST_MODELS, "m"),
    NavEntry("Audit", "/audit", LIST_AUDIT, "a"),
)
