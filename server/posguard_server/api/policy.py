"""The ``posguard.v1.Policy`` service: lists, rules and backtests.

Every change goes through ``SqlPolicyStore`` in one transaction with its audit event and a bump of the
policy generation, which every server's ``PolicyCache`` picks up within ``model_refresh_seconds``. A rule's
condition is compiled here before anything is stored: one that does not compile is INVALID_ARGUMENT naming
the line and column of the fault.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from grpc import aio

from posguard.v1 import policy_pb2, policy_pb2_grpc
from posguard_server.api.convert import timestamp
from posguard_server.api.pipeline import current_principal
from posguard_server.api.validation import Checker, fingerprint, make_page_token
from posguard_server.domain.errors import FieldViolation, InvalidArgument
from posguard_server.domain.policy import (
    LIST_NAME_PATTERN,
    NAME_PATTERN,
    REASON_MAX,
    VALUE_MAX,
    ListEntry,
    ListKind,
    ListType,
    PolicyList,
    Rule,
    RuleAction,
    RuleStatus,
    normalize_value,
)
from posguard_server.domain.rule_language import MAX_EXPRESSION_LENGTH, RuleSyntaxError, compile_condition
from posguard_server.services.backtest import MAX_BACKTEST_DAYS, BacktestService, DayCounts
from posguard_server.store.policy import SqlPolicyStore

log = logging.getLogger(__name__)
Context = aio.ServicerContext[Any, Any]

KIND_TO_PROTO: dict[ListKind, policy_pb2.ListKind.ValueType] = {
    ListKind.CUSTOMER: policy_pb2.LIST_KIND_CUSTOMER,
    ListKind.NUMBER: policy_pb2.LIST_KIND_NUMBER,
    ListKind.EXTERNAL_ID: policy_pb2.LIST_KIND_EXTERNAL_ID,
    ListKind.MERCHANT: policy_pb2.LIST_KIND_MERCHANT,
    ListKind.TERMINAL: policy_pb2.LIST_KIND_TERMINAL,
    ListKind.MCC: policy_pb2.LIST_KIND_MCC,
}
KIND_FROM_PROTO = {v: k for k, v in KIND_TO_PROTO.items()}
TYPE_TO_PROTO: dict[ListType, policy_pb2.ListType.ValueType] = {
    ListType.DENY: policy_pb2.LIST_TYPE_DENY,
    ListType.ALLOW: policy_pb2.LIST_TYPE_ALLOW,
}
TYPE_FROM_PROTO = {v: k for k, v in TYPE_TO_PROTO.items()}
ACTION_TO_PROTO: dict[RuleAction, policy_pb2.RuleAction.ValueType] = {
    RuleAction.DECLINE: policy_pb2.RULE_ACTION_DECLINE,
    RuleAction.REVIEW: policy_pb2.RULE_ACTION_REVIEW,
    RuleAction.REASON: policy_pb2.RULE_ACTION_REASON,
}
ACTION_FROM_PROTO = {v: k for k, v in ACTION_TO_PROTO.items()}
STATUS_TO_PROTO: dict[RuleStatus, policy_pb2.RuleStatus.ValueType] = {
    RuleStatus.DRAFT: policy_pb2.RULE_STATUS_DRAFT,
    RuleStatus.ACTIVE: policy_pb2.RULE_STATUS_ACTIVE,
    RuleStatus.RETIRED: policy_pb2.RULE_STATUS_RETIRED,
}
STATUS_FROM_PROTO = {v: k for k, v in STATUS_TO_PROTO.items()}

_NAME_HINT = "must be 1 to 64 of A-Z 0-9 _, starting with a letter"
_LIST_NAME_HINT = "must be 1 to 64 of a-z 0-9 _ . -, starting with a letter or digit"


def list_message(plist: PolicyList) -> policy_pb2.PolicyList:
    return policy_pb2.PolicyList(
        name=plist.name,
        kind=KIND_TO_PROTO[plist.kind],
        type=TYPE_TO_PROTO[plist.type],
        description=plist.description,
        created_at=timestamp(plist.created_at),
        created_by=plist.created_by,
        entries=plist.entries,
    )


def entry_message(entry: ListEntry) -> policy_pb2.ListEntry:
    return policy_pb2.ListEntry(
        list_name=entry.list_name,
        value=entry.value,
        reason=entry.reason,
        author=entry.author,
        added_at=timestamp(entry.created_at),
        expires_at=timestamp(entry.expires_at),
    )


def rule_message(rule: Rule) -> policy_pb2.Rule:
    return policy_pb2.Rule(
        name=rule.name,
        version=rule.version,
        condition=rule.condition,
        action=ACTION_TO_PROTO[rule.action],
        reason=rule.reason,
        status=STATUS_TO_PROTO[rule.status],
        created_at=timestamp(rule.created_at),
        created_by=rule.created_by,
        activated_at=timestamp(rule.activated_at),
        retired_at=timestamp(rule.retired_at),
    )


def _day_message(counts: DayCounts) -> policy_pb2.BacktestDay:
    return policy_pb2.BacktestDay(
        day=counts.day.isoformat() if counts.day is not None else "",
        transactions=counts.transactions,
        fraud=counts.fraud,
        hits=counts.hits,
        fraud_hits=counts.fraud_hits,
        decisions_changed=counts.decisions_changed,
        declines=counts.declines,
        reviews=counts.reviews,
    )


def compile_or_refuse(condition: str, field: str) -> None:
    """INVALID_ARGUMENT (RULE_DOES_NOT_COMPILE) naming where ``condition`` fails to compile, if it does."""
    try:
        compile_condition(condition)
    except RuleSyntaxError as error:
        raise InvalidArgument(
            [FieldViolation(field, str(error))],
            message=f"the condition does not compile: {error}",
            reason="RULE_DOES_NOT_COMPILE",
            metadata={"line": str(error.line), "column": str(error.column)},
        ) from None


class PolicyServicer(policy_pb2_grpc.PolicyServicer):
    def __init__(self, store: SqlPolicyStore, backtests: BacktestService) -> None:
        self._store = store
        self._backtests = backtests

    async def CreateList(
        self, request: policy_pb2.CreateListRequest, context: Context
    ) -> policy_pb2.CreateListResponse:
        check = Checker()
        check.request_id(request.request_id)
        check.text(
            request.name,
            "name",
            required=True,
            max_length=64,
            pattern=LIST_NAME_PATTERN,
            pattern_hint=_LIST_NAME_HINT,
        )
        check.check(request.kind in KIND_FROM_PROTO, "kind", "must be a known list kind")
        check.check(request.type in TYPE_FROM_PROTO, "type", "must be DENY or ALLOW")
        check.text(request.description, "description", max_length=REASON_MAX)
        check.done()
        created = await asyncio.to_thread(
            self._store.create_list,
            request.name,
            KIND_FROM_PROTO[request.kind],
            TYPE_FROM_PROTO[request.type],
            request.description,
            actor=current_principal().key_id,
            now=datetime.now(UTC),
            request_id=request.request_id,
            fingerprint=fingerprint(request),
        )
        return policy_pb2.CreateListResponse(list=list_message(created))

    async def ListLists(
        self, request: policy_pb2.ListListsRequest, context: Context
    ) -> policy_pb2.ListListsResponse:
        lists = await asyncio.to_thread(self._store.list_lists, datetime.now(UTC))
        return policy_pb2.ListListsResponse(lists=[list_message(plist) for plist in lists])

    async def AddListEntry(
        self, request: policy_pb2.AddListEntryRequest, context: Context
    ) -> policy_pb2.AddListEntryResponse:
        now = datetime.now(UTC)
        check = Checker()
        check.request_id(request.request_id)
        check.text(request.list_name, "list_name", required=True, max_length=64)
        check.text(request.value.strip(), "value", required=True, max_length=VALUE_MAX)
        check.text(request.reason, "reason", required=True, max_length=REASON_MAX)
        expires_at = check.timestamp(request, "expires_at")
        if expires_at is not None:
            check.check(expires_at > now, "expires_at", "must be in the future")
        check.done()
        plist = await asyncio.to_thread(self._store.get_list, request.list_name)
        entry = await asyncio.to_thread(
            self._store.add_entry,
            request.list_name,
            normalize_value(plist.kind, request.value),
            reason=request.reason,
            expires_at=expires_at,
            actor=current_principal().key_id,
            now=now,
            request_id=request.request_id,
            fingerprint=fingerprint(request),
        )
        log.info("list %s: entry added by %s", request.list_name, entry.author)
        return policy_pb2.AddListEntryResponse(entry=entry_message(entry))

    async def RemoveListEntry(
        self, request: policy_pb2.RemoveListEntryRequest, context: Context
    ) -> policy_pb2.RemoveListEntryResponse:
        check = Checker()
        check.request_id(request.request_id)
        check.text(request.list_name, "list_name", required=True, max_length=64)
        check.text(request.value.strip(), "value", required=True, max_length=VALUE_MAX)
        check.text(request.reason, "reason", required=True, max_length=REASON_MAX)
        check.done()
        plist = await asyncio.to_thread(self._store.get_list, request.list_name)
        removed = await asyncio.to_thread(
            self._store.remove_entry,
            request.list_name,
            normalize_value(plist.kind, request.value),
            reason=request.reason,
            actor=current_principal().key_id,
            now=datetime.now(UTC),
            request_id=request.request_id,
            fingerprint=fingerprint(request),
        )
        return policy_pb2.RemoveListEntryResponse(removed=removed)

    async def ListEntries(
        self, request: policy_pb2.ListEntriesRequest, context: Context
    ) -> policy_pb2.ListEntriesResponse:
        check = Checker()
        check.text(request.list_name, "list_name", required=True, max_length=64)
        limit = check.page_size(request.page_size)
        query = f"entries:{request.list_name}:{request.include_expired}"
        after = check.page_token(request.page_token, query)
        check.done()
        entries, cursor = await asyncio.to_thread(
            self._store.list_entries,
            request.list_name,
            now=datetime.now(UTC),
            include_expired=request.include_expired,
            limit=limit,
            after=after,
        )
        return policy_pb2.ListEntriesResponse(
            entries=[entry_message(e) for e in entries], next_page_token=make_page_token(cursor, query)
        )

    async def CreateRule(
        self, request: policy_pb2.CreateRuleRequest, context: Context
    ) -> policy_pb2.CreateRuleResponse:
        check = Checker()
        check.request_id(request.request_id)
        check.text(
            request.name, "name", required=True, max_length=64, pattern=NAME_PATTERN, pattern_hint=_NAME_HINT
        )
        check.check(request.action in ACTION_FROM_PROTO, "action", "must be DECLINE, REVIEW or REASON")
        check.text(request.reason, "reason", required=True, max_length=REASON_MAX)
        check.check(
            len(request.condition) <= MAX_EXPRESSION_LENGTH,
            "condition",
            f"must be at most {MAX_EXPRESSION_LENGTH} characters",
        )
        check.done()
        compile_or_refuse(request.condition, "condition")
        rule = await asyncio.to_thread(
            self._store.create_rule,
            request.name,
            request.condition,
            ACTION_FROM_PROTO[request.action],
            request.reason,
            actor=current_principal().key_id,
            now=datetime.now(UTC),
            request_id=request.request_id,
            fingerprint=fingerprint(request),
        )
        return policy_pb2.CreateRuleResponse(rule=rule_message(rule))

    async def ActivateRule(
        self, request: policy_pb2.ActivateRuleRequest, context: Context
    ) -> policy_pb2.ActivateRuleResponse:
        check = Checker()
        check.request_id(request.request_id)
        check.text(request.name, "name", required=True, max_length=64)
        check.check(request.version >= 0, "version", "must not be negative")
        check.text(request.reason, "reason", required=True, max_length=REASON_MAX)
        check.done()
        actor = current_principal().key_id
        rule, retired = await asyncio.to_thread(
            self._store.activate_rule,
            request.name,
            request.version,
            reason=request.reason,
            actor=actor,
            now=datetime.now(UTC),
            request_id=request.request_id,
            fingerprint=fingerprint(request),
        )
        log.info("rule %s version %d activated by %s", rule.name, rule.version, actor)
        return policy_pb2.ActivateRuleResponse(rule=rule_message(rule), retired_version=retired)

    async def RetireRule(
        self, request: policy_pb2.RetireRuleRequest, context: Context
    ) -> policy_pb2.RetireRuleResponse:
        check = Checker()
        check.request_id(request.request_id)
        check.text(request.name, "name", required=True, max_length=64)
        check.text(request.reason, "reason", required=True, max_length=REASON_MAX)
        check.done()
        actor = current_principal().key_id
        rule = await asyncio.to_thread(
            self._store.retire_rule,
            request.name,
            reason=request.reason,
            actor=actor,
            now=datetime.now(UTC),
            request_id=request.request_id,
            fingerprint=fingerprint(request),
        )
        log.info("rule %s version %d retired by %s", rule.name, rule.version, actor)
        return policy_pb2.RetireRuleResponse(rule=rule_message(rule))

    async def ListRules(
        self, request: policy_pb2.ListRulesRequest, context: Context
    ) -> policy_pb2.ListRulesResponse:
        check = Checker()
        check.text(request.name, "name", max_length=64)
        status = None
        if request.status != policy_pb2.RULE_STATUS_UNSPECIFIED and check.check(
            request.status in STATUS_FROM_PROTO, "status", "is not a known status"
        ):
            status = STATUS_FROM_PROTO[request.status]
        check.done()
        rules = await asyncio.to_thread(self._store.list_rules, name=request.name, status=status)
        return policy_pb2.ListRulesResponse(rules=[rule_message(rule) for rule in rules])

    async def BacktestRules(
        self, request: policy_pb2.BacktestRulesRequest, context: Context
    ) -> policy_pb2.BacktestRulesResponse:
        check = Checker()
        check.check(
            bool(request.rules or request.conditions or request.lists),
            "rules",
            "name at least one rule, condition or list to backtest",
        )
        for i, ref in enumerate(request.rules):
            check.text(ref.name, f"rules[{i}].name", required=True, max_length=64)
            check.check(ref.version >= 0, f"rules[{i}].version", "must not be negative")
        for i, candidate in enumerate(request.conditions):
            check.text(
                candidate.name,
                f"conditions[{i}].name",
                required=True,
                max_length=64,
                pattern=NAME_PATTERN,
                pattern_hint=_NAME_HINT,
            )
            check.check(
                candidate.action in ACTION_FROM_PROTO,
                f"conditions[{i}].action",
                "must be DECLINE, REVIEW or REASON",
            )
        for i, name in enumerate(request.lists):
            check.text(name, f"lists[{i}]", required=True, max_length=64)
        since = check.timestamp(request, "start_time")
        until = check.timestamp(request, "end_time")
        check.check(since is not None, "start_time", "is required")
        check.check(until is not None, "end_time", "is required")
        if (
            since is not None
            and until is not None
            and check.check(until > since, "end_time", "must be after start_time")
        ):
            check.check(
                until - since <= timedelta(days=MAX_BACKTEST_DAYS),
                "end_time",
                f"must be at most {MAX_BACKTEST_DAYS} days after start_time",
            )
        check.done()
        for i, candidate in enumerate(request.conditions):
            compile_or_refuse(candidate.condition, f"conditions[{i}].condition")
        assert since is not None
        assert until is not None
        now = datetime.now(UTC)

        def run() -> policy_pb2.BacktestRulesResponse:
            rules = [self._store.get_rule(ref.name, ref.version) for ref in request.rules]
            rules += [
                Rule(
                    name=c.name,
                    version=0,
                    condition=c.condition,
                    action=ACTION_FROM_PROTO[c.action],
                    reason=c.name,
                    status=RuleStatus.DRAFT,
                    created_at=now,
                    created_by="",
                )
                for c in request.conditions
            ]
            lists = []
            for name in request.lists:
                entries, _ = self._store.list_entries(
                    name, now=now, include_expired=False, limit=1_000_000, after=None
                )
                lists.append((self._store.get_list(name), entries))
            report = self._backtests.run(rules, lists, since=since, until=until, now=now)
            return policy_pb2.BacktestRulesResponse(
                days=[_day_message(day) for day in report.days], total=_day_message(report.total)
            )

        return await asyncio.to_thread(run)
