"""Idempotency keys of mutating calls: what a call with a request_id did, kept so that a retry replays it.

A key belongs to its caller (the API key that made the call), so another caller's request under the same
request_id is a call of its own: it can neither borrow the first caller's answer nor be refused because of
it. The stores that answer a retry from their own rows (customers, API keys, redemption attempts, outcome
reports) scope those rows the same way.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from posguard_server.domain.errors import InvalidArgument
from posguard_server.store.schema import PRINCIPAL_MAX, REQUEST_ID_MAX, Base

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

FINGERPRINT_MAX = 64
CUSTOMER_ID_MAX = 32
NUMBER_MAX = 40
METHOD_MAX = 64


class SqlIdempotencyKey(Base):
    """A mutating call carried out: who made it, its request_id, what it asked, and what it touched."""

    __tablename__ = "idempotency_keys"

    method: Mapped[str] = mapped_column(String(METHOD_MAX), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(REQUEST_ID_MAX), primary_key=True)
    # The key id of the caller; "" for keys recorded before keys were scoped to callers (no caller matches).
    caller: Mapped[str] = mapped_column(String(PRINCIPAL_MAX), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(FINGERPRINT_MAX))
    # The customer the call touched ("" when none: an API key, a global model).
    customer_id: Mapped[str] = mapped_column(String(CUSTOMER_ID_MAX))
    # The number the call produced, when it produced one (a sub number), so a retry answers with it.
    result_number: Mapped[str | None] = mapped_column(String(NUMBER_MAX))
    created_at: Mapped[datetime]


def idempotency_conflict(field: str = "request_id", message: str = "") -> InvalidArgument:
    """The error of a request_id reused by its caller for a different request."""
    return InvalidArgument.field(
        field, message or "was already used for a different request", reason="IDEMPOTENCY_CONFLICT"
    )


def earlier_call(
    session: Session, method: str, caller: str, request_id: str, fingerprint: str
) -> SqlIdempotencyKey | None:
    """The caller's earlier call of ``method`` with this request_id; None if there was none.

    The same request_id with another fingerprint is an ``InvalidArgument`` (IDEMPOTENCY_CONFLICT).
    """
    done = session.get(SqlIdempotencyKey, (method, request_id, caller))
    if done is not None and done.fingerprint != fingerprint:
        raise idempotency_conflict()
    return done


def record_call(
    session: Session,
    method: str,
    caller: str,
    request_id: str,
    fingerprint: str,
    *,
    customer_id: str,
    now: datetime,
    result_number: str | None = None,
) -> None:
    """Keep a call's key in the caller's transaction: the call happened if and only if its key is kept."""
    session.add(
        SqlIdempotencyKey(
            method=method,
            request_id=request_id,
            caller=caller,
            fingerprint=fingerprint,
            customer_id=customer_id,
            result_number=result_number,
            created_at=now,
        )
    )
