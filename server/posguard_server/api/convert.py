"""Conversions between domain objects and posguard.v1 messages; one place for each mapping."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from posguard.v1 import admin_pb2
from posguard_server.domain.api_keys import ApiKey, Role

ROLE_TO_PROTO: dict[Role, admin_pb2.Role.ValueType] = {
    Role.GATEWAY: admin_pb2.ROLE_GATEWAY,
    Role.ADMIN: admin_pb2.ROLE_ADMIN,
    Role.AUDITOR: admin_pb2.ROLE_AUDITOR,
    Role.TRAINER: admin_pb2.ROLE_TRAINER,
}
ROLE_FROM_PROTO: dict[admin_pb2.Role.ValueType, Role] = {v: k for k, v in ROLE_TO_PROTO.items()}


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def api_key(key: ApiKey) -> admin_pb2.ApiKey:
    return admin_pb2.ApiKey(
        key_id=key.key_id,
        name=key.name,
        role=ROLE_TO_PROTO[key.role],
        created_at=timestamp(key.created_at),
        created_by=key.created_by,
        revoked=key.revoked,
        revoked_at=timestamp(key.revoked_at),
        revoke_reason=key.revoke_reason or "",
    )
