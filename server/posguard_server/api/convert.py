"""Conversions between domain objects and posguard.v1 messages; one place for each mapping."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from posguard.v1 import admin_pb2
from posguard_server.domain.api_keys import ApiKey, Role
from posguard_server.domain.audit import AuditEvent, AuditProblem

ROLE_TO_PROTO: dict[Role, admin_pb2.Role.ValueType] = {
    Role.GATEWAY: admin_pb2.ROLE_GATEWAY,
    Role.ADMIN: admin_pb2.ROLE_ADMIN,
    Role.AUDITOR: admin_pb2.ROLE_AUDITOR,
    Role.TRAINER: admin_pb2.ROLE_TRAINER,
}
ROLE_FROM_PROTO: dict[admin_pb2.Role.ValueType, Role] = {v: k for k, v in ROLE_TO_PROTO.items()}

AUDIT_PROBLEM_TO_PROTO: dict[AuditProblem, admin_pb2.AuditProblem.ValueType] = {
    AuditProblem.NONE: admin_pb2.AUDIT_PROBLEM_NONE,
    AuditProblem.EDITED: admin_pb2.AUDIT_PROBLEM_EDITED,
    AuditProblem.DELETED: admin_pb2.AUDIT_PROBLEM_DELETED,
    AuditProblem.INSERTED: admin_pb2.AUDIT_PROBLEM_INSERTED,
    AuditProblem.REORDERED: admin_pb2.AUDIT_PROBLEM_REORDERED,
}


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


def audit_event(event: AuditEvent) -> admin_pb2.AuditEvent:
    return admin_pb2.AuditEvent(
        sequence=event.sequence,
        occurred_at=timestamp(event.occurred_at),
        actor=event.actor,
        action=event.action,
        subject=event.subject,
        details=dict(event.details),
        previous_hash=event.previous_hash,
        hash=event.hash,
    )
