"""The ``posguard.v1.Admin`` service: API keys, the model registry and the audit log.

Models: ListModels pages the registry; PromoteModel and RollbackModel move a whole training run (GLOBAL
scope) or one customer's model (CUSTOMER scope) in one registry transaction, which serving processes pick up
within their refresh interval, without a restart. Both are idempotent by request_id: the store keeps the
key and the answer (in the call's audit event) in the transaction that made the change.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from typing import Any

from grpc import aio

from posguard.v1 import admin_pb2, admin_pb2_grpc, risk_pb2
from posguard_server.api import convert
from posguard_server.api.auth import Authenticator
from posguard_server.api.pipeline import current_principal
from posguard_server.api.validation import Checker, fingerprint, make_page_token
from posguard_server.domain.api_keys import ApiKeyRepository, create_key
from posguard_server.domain.audit import ACTION_MAX, ACTOR_MAX, SUBJECT_MAX, AuditLog
from posguard_server.domain.risk import ModelScope
from posguard_server.store.customers import CUSTOMER_ID_MAX
from posguard_server.store.model_registry import SqlModelRegistry
from posguard_server.store.risk_tables import MODEL_VERSION_MAX

log = logging.getLogger(__name__)

MAX_KEY_NAME = 100
MAX_REASON = 500
Context = aio.ServicerContext[Any, Any]


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(
        self, keys: ApiKeyRepository, audit: AuditLog, authenticator: Authenticator, models: SqlModelRegistry
    ) -> None:
        self._keys = keys
        self._audit = audit
        self._authenticator = authenticator
        self._models = models

    async def CreateApiKey(
        self, request: admin_pb2.CreateApiKeyRequest, context: Context
    ) -> admin_pb2.CreateApiKeyResponse:
        check = Checker()
        check.request_id(request.request_id)
        check.text(request.name, "name", required=True, max_length=MAX_KEY_NAME)
        check.check(
            request.role in convert.ROLE_FROM_PROTO,
            "role",
            "must be GATEWAY, ADMIN, AUDITOR, TRAINER or ANALYST",
        )
        check.done()
        key, token = await asyncio.to_thread(
            create_key,
            self._keys,
            name=request.name,
            role=convert.ROLE_FROM_PROTO[request.role],
            created_by=current_principal().key_id,
            request_id=request.request_id,
        )
        return admin_pb2.CreateApiKeyResponse(
            key=convert.api_key(key), token=token or "", replayed=token is None
        )

    async def ListApiKeys(
        self, request: admin_pb2.ListApiKeysRequest, context: Context
    ) -> admin_pb2.ListApiKeysResponse:
        check = Checker()
        role_filter = None
        if request.role != admin_pb2.ROLE_UNSPECIFIED and check.check(
            request.role in convert.ROLE_FROM_PROTO, "role", "is not a known role"
        ):
            role_filter = convert.ROLE_FROM_PROTO[request.role]
        limit = check.page_size(request.page_size)
        query = f"keys:{request.role}:{request.include_revoked}"
        after = check.page_token(request.page_token, query)
        check.done()
        keys, cursor = await asyncio.to_thread(
            self._keys.list,
            role=role_filter,
            include_revoked=request.include_revoked,
            limit=limit,
            after=after,
        )
        return admin_pb2.ListApiKeysResponse(
            keys=[convert.api_key(k) for k in keys], next_page_token=make_page_token(cursor, query)
        )

    async def RevokeApiKey(
        self, request: admin_pb2.RevokeApiKeyRequest, context: Context
    ) -> admin_pb2.RevokeApiKeyResponse:
        check = Checker()
        check.request_id(request.request_id)
        check.text(request.key_id, "key_id", required=True, max_length=32)
        check.text(request.reason, "reason", required=True, max_length=MAX_REASON)
        check.done()
        key = await asyncio.to_thread(
            self._keys.revoke,
            request.key_id,
            revoked_by=current_principal().key_id,
            reason=request.reason,
            now=datetime.now(UTC),
            request_id=request.request_id,
            fingerprint=fingerprint(request),
        )
        self._authenticator.invalidate(key.key_id)
        return admin_pb2.RevokeApiKeyResponse(key=convert.api_key(key))

    async def ListModels(
        self, request: admin_pb2.ListModelsRequest, context: Context
    ) -> admin_pb2.ListModelsResponse:
        check = Checker()
        scope = None
        if request.scope != risk_pb2.MODEL_SCOPE_UNSPECIFIED and check.check(
            request.scope in convert.MODEL_SCOPE_FROM_PROTO,
            "scope",
            "must be CUSTOMER, GLOBAL or UNSPECIFIED",
        ):
            scope = convert.MODEL_SCOPE_FROM_PROTO[request.scope]
        check.text(request.customer_id, "customer_id", max_length=CUSTOMER_ID_MAX)
        if request.customer_id and request.scope not in (
            risk_pb2.MODEL_SCOPE_UNSPECIFIED,
            risk_pb2.MODEL_SCOPE_CUSTOMER,
        ):
            check.fail("customer_id", "is only a filter of CUSTOMER models")
        limit = check.page_size(request.page_size)
        query = "models:" + json.dumps(
            [request.scope, request.customer_id, request.active_only], separators=(",", ":")
        )
        after = check.page_token(request.page_token, query)
        check.done()
        models, cursor = await asyncio.to_thread(
            self._models.list_models,
            scope=scope,
            customer_id=request.customer_id,
            active_only=request.active_only,
            limit=limit,
            after_id=after,
        )
        return admin_pb2.ListModelsResponse(
            models=[convert.model(m) for m in models], next_page_token=make_page_token(cursor, query)
        )

    async def PromoteModel(
        self, request: admin_pb2.PromoteModelRequest, context: Context
    ) -> admin_pb2.PromoteModelResponse:
        check = Checker()
        check.request_id(request.request_id)
        scope = _registry_scope(check, request.scope, request.customer_id)
        check.text(request.version, "version", required=True, max_length=MODEL_VERSION_MAX)
        check.text(request.reason, "reason", required=True, max_length=MAX_REASON)
        check.done()
        assert scope is not None
        actor = current_principal().key_id
        result = await asyncio.to_thread(
            self._models.promote,
            scope,
            request.customer_id,
            request.version,
            force=request.force,
            now=datetime.now(UTC),
            actor=actor,
            reason=request.reason,
            request_id=request.request_id,
            fingerprint=fingerprint(request),
        )
        log.info(
            "model version %s promoted (%s%s) by %s: %d customer models%s",
            result.version,
            scope.value,
            f" {request.customer_id}" if request.customer_id else "",
            actor,
            result.customer_models,
            ", forced" if result.overridden else "",
        )
        return admin_pb2.PromoteModelResponse(
            model=convert.model(result.model) if result.model is not None else None,
            previous_version=result.previous_version,
            customer_models=result.customer_models,
        )

    async def RollbackModel(
        self, request: admin_pb2.RollbackModelRequest, context: Context
    ) -> admin_pb2.RollbackModelResponse:
        check = Checker()
        check.request_id(request.request_id)
        scope = _registry_scope(check, request.scope, request.customer_id)
        check.text(request.version, "version", max_length=MODEL_VERSION_MAX)
        if request.version and scope is ModelScope.CUSTOMER:
            check.fail("version", "is only for the GLOBAL scope: a training run is rolled back as a whole")
        check.text(request.reason, "reason", required=True, max_length=MAX_REASON)
        check.done()
        assert scope is not None
        actor = current_principal().key_id
        result = await asyncio.to_thread(
            self._models.rollback,
            scope,
            request.customer_id,
            version=request.version,
            now=datetime.now(UTC),
            actor=actor,
            reason=request.reason,
            request_id=request.request_id,
            fingerprint=fingerprint(request),
        )
        log.info(
            "model version %s rolled back (%s%s) by %s: %d customer models restored, %d retired",
            result.rolled_back_version,
            scope.value,
            f" {request.customer_id}" if request.customer_id else "",
            actor,
            result.customer_models_restored,
            result.customer_models_retired,
        )
        return admin_pb2.RollbackModelResponse(
            model=convert.model(result.model) if result.model is not None else None,
            rolled_back_version=result.rolled_back_version,
            customer_models_restored=result.customer_models_restored,
            customer_models_retired=result.customer_models_retired,
        )

    async def ListAuditEvents(
        self, request: admin_pb2.ListAuditEventsRequest, context: Context
    ) -> admin_pb2.ListAuditEventsResponse:
        check = Checker()
        check.text(request.action, "action", max_length=ACTION_MAX)
        check.text(request.actor, "actor", max_length=ACTOR_MAX)
        check.text(request.subject, "subject", max_length=SUBJECT_MAX)
        occurred_after, occurred_before = check.time_range(request, "occurred_after", "occurred_before")
        limit = check.page_size(request.page_size)
        # JSON rather than joined text: filter values may contain any separator, and the token must not fit
        # a different set of filters.
        filters = [
            request.action,
            request.actor,
            request.subject,
            occurred_after.isoformat() if occurred_after else "",
            occurred_before.isoformat() if occurred_before else "",
        ]
        query = "audit:" + json.dumps(filters, separators=(",", ":"))
        after = check.page_token(request.page_token, query)
        check.done()
        events, cursor = await asyncio.to_thread(
            self._audit.list,
            action=request.action or None,
            actor=request.actor or None,
            subject=request.subject or None,
            occurred_after=occurred_after,
            occurred_before=occurred_before,
            limit=limit,
            after=after,
        )
        return admin_pb2.ListAuditEventsResponse(
            events=[convert.audit_event(e) for e in events], next_page_token=make_page_token(cursor, query)
        )

    async def VerifyAuditLog(
        self, request: admin_pb2.VerifyAuditLogRequest, context: Context
    ) -> admin_pb2.VerifyAuditLogResponse:
        check = Checker()
        check.check(request.from_sequence >= 0, "from_sequence", "must not be negative")
        check.done()
        report = await asyncio.to_thread(self._audit.verify, request.from_sequence)
        if not report.intact:
            # A broken chain means someone changed the database behind posguard's back: operators must know
            # even when the caller does not pass it on.
            log.warning(
                "audit log verification found a break at event %d (%s): %s",
                report.first_bad_sequence,
                report.problem.value,
                report.detail,
            )
        return admin_pb2.VerifyAuditLogResponse(
            intact=report.intact,
            entries_checked=report.entries_checked,
            first_bad_sequence=report.first_bad_sequence,
            problem=convert.AUDIT_PROBLEM_TO_PROTO[report.problem],
            detail=report.detail,
        )


def _registry_scope(
    check: Checker, scope: risk_pb2.ModelScope.ValueType, customer_id: str
) -> ModelScope | None:
    """The registry scope of a PromoteModel or RollbackModel request, and its customer_id checked with it."""
    value = convert.MODEL_SCOPE_FROM_PROTO.get(scope)
    check.check(value is not None, "scope", "must be CUSTOMER or GLOBAL")
    check.text(customer_id, "customer_id", max_length=CUSTOMER_ID_MAX)
    if value is ModelScope.CUSTOMER and not customer_id:
        check.fail("customer_id", "is required for the CUSTOMER scope")
    elif value is ModelScope.GLOBAL and customer_id:
        check.fail("customer_id", "must be empty for the GLOBAL scope, which moves a whole training run")
    return value
