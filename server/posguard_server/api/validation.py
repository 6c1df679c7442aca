"""Request validation: collect every field violation of a request, then raise them together.

Servicers validate before they touch storage, so a rejected request changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime

from google.protobuf.message import Message

from posguard_server.api.convert import to_datetime
from posguard_server.domain.errors import FieldViolation, InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Tokens this server makes stay far below this; longer ones are refused before they are decoded.
MAX_PAGE_TOKEN = 4096
MAX_REQUEST_ID = 128
_REQUEST_ID = re.compile(r"[\x20-\x7e]+")


@dataclass
class Checker:
    """Accumulates violations; ``done()`` raises ``InvalidArgument`` naming all of them."""

    violations: list[FieldViolation] = field(default_factory=list)

    def fail(self, field_path: str, description: str) -> None:
        self.violations.append(FieldViolation(field_path, description))

    def check(self, ok: bool, field_path: str, description: str) -> bool:
        if not ok:
            self.fail(field_path, description)
        return ok

    def text(
        self,
        value: str,
        field_path: str,
        *,
        required: bool = False,
        max_length: int,
        pattern: re.Pattern[str] | None = None,
        pattern_hint: str = "",
    ) -> None:
        if not value:
            if required:
                self.fail(field_path, "is required")
            return
        if len(value) > max_length:
            self.fail(field_path, f"must be at most {max_length} characters")
        elif not value.isprintable():
            self.fail(field_path, "must not contain control characters")
        elif pattern is not None and not pattern.fullmatch(value):
            self.fail(field_path, pattern_hint or "has an invalid format")

    def request_id(self, value: str, *, required: bool = True, field_path: str = "request_id") -> None:
        self.text(
            value,
            field_path,
            required=required,
            max_length=MAX_REQUEST_ID,
            pattern=_REQUEST_ID,
            pattern_hint="must be printable ASCII",
        )

    def page_size(self, value: int, field_path: str = "page_size") -> int:
        if value < 0:
            self.fail(field_path, "must not be negative")
            return DEFAULT_PAGE_SIZE
        # AIP-158: a page size above the maximum is coerced, not refused.
        return min(value, MAX_PAGE_SIZE) or DEFAULT_PAGE_SIZE

    def page_token(self, value: str, query: str, field_path: str = "page_token") -> int | None:
        """The cursor inside a token made by :func:`make_page_token` for the same query, or None."""
        if not value:
            return None
        try:
            if len(value) > MAX_PAGE_TOKEN:
                raise ValueError
            data = json.loads(base64.urlsafe_b64decode(value.encode("ascii") + b"=" * (-len(value) % 4)))
            after, for_query = data["after"], data["q"]
            # A cursor is a row id: a signed 64-bit integer in every database posguard runs on.
            if not isinstance(after, int) or isinstance(after, bool) or not 0 <= after < 2**63:
                raise ValueError
            if for_query != query:
                raise ValueError
        # RecursionError: JSON nested deeper than the parser's stack (short enough to fit the length bound).
        except (ValueError, KeyError, TypeError, UnicodeError, binascii.Error, RecursionError):
            self.fail(field_path, "is not a token returned by the previous page of this same query")
            return None
        return after

    def timestamp(self, message: Message, name: str, path: str | None = None) -> datetime | None:
        """The Timestamp field ``name`` of ``message`` as aware UTC; None when unset or invalid (noted).

        ``path``: where a violation is reported, when ``message`` is nested in the request (default ``name``).
        """
        if not message.HasField(name):
            return None
        try:
            value = to_datetime(getattr(message, name))
        except ValueError:  # seconds outside years 1 to 9999, or nanos outside a second
            self.fail(path or name, "must be a valid time between the years 1 and 9999")
            return None
        return value

    def time_range(
        self, message: Message, after_field: str, before_field: str
    ) -> tuple[datetime | None, datetime | None]:
        """Two optional Timestamp fields bounding a period; the second must not come before the first."""
        after, before = self.timestamp(message, after_field), self.timestamp(message, before_field)
        if after is not None and before is not None and before < after:
            self.fail(before_field, f"must not be earlier than {after_field}")
        return after, before

    def done(self) -> None:
        if self.violations:
            raise InvalidArgument(self.violations)


def make_page_token(after: int | None, query: str) -> str:
    """An opaque token for the next page; bound to the query's filters so it cannot be reused across them."""
    if after is None:
        return ""
    raw = json.dumps({"after": after, "q": query}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def fingerprint(request: Message) -> str:
    """What a request asks for, apart from its request_id: a retry must match it exactly.

    The one definition every RPC's idempotency uses. Fields this server does not know are left out (at every
    depth): they ask it for nothing, and a client built on a newer contract must be able to retry.
    """
    copy = type(request)()
    copy.CopyFrom(request)
    copy.DiscardUnknownFields()
    if "request_id" in copy.DESCRIPTOR.fields_by_name:
        copy.ClearField("request_id")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()
