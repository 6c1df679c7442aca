"""The ``posguard.v1.Admin`` service: API keys now; models and audit arrive with their issues."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from grpc import aio

from posguard.v1 import admin_pb2, admin_pb2_grpc
from posguard_server.api import convert
from posguard_server.api.auth import Authenticator
from posguard_server.api.interceptors import current_principal
from posguard_server.api.validation import Checker, make_page_token
from posguard_server.domain.api_keys import ApiKeyRepository, create_key

MAX_KEY_NAME = 100
MAX_REASON = 500
Context = aio.ServicerContext[Any, Any]


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, keys: ApiKeyRepository, authenticator: Authenticator) -> None:
        self._keys = keys
        self._authenticator = authenticator

    async def CreateApiKey(
        self, request: admin_pb2.CreateApiKeyRequest, context: Context
    ) -> admin_pb2.CreateApiKeyResponse:
        check = Checker()
        check.request_id(request.request_id)
        check.text(request.name, "name", required=True, max_length=MAX_KEY_NAME)
        check.check(
            request.role in convert.ROLE_FROM_PROTO, "role", "must be GATEWAY, ADMIN, AUDITOR or TRAINER"
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
        )
        self._authenticator.invalidate(key.key_id)
        return admin_pb2.RevokeApiKeyResponse(key=convert.api_key(key))
