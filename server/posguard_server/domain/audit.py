"""The audit log's hash chain: what an event is, how its hash is computed, and how a chain is checked.

Every event carries the hash of the event before it (``GENESIS_HASH`` for the first), and its own hash covers
that link together with all of its content. Changing, removing, adding or moving any event therefore breaks
the chain at a place :func:`verify_chain` can name. The chain proves integrity, not authorship: someone who
can rewrite the database can also recompute every hash from the tampered event onwards, so the log's head
(the sequence and hash of the last event, kept apart from the events) is checked as well, and operators
should keep copies of recent head hashes outside the database.

This module is pure: no storage and no transport, so the same code checks a chain read from the database, a
chain exported to a file, or a chain built in a test.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from itertools import islice
from types import MappingProxyType
from typing import Protocol

GENESIS_HASH = "0" * 64
"""The ``previous_hash`` of the first event: no event hashes to 64 zeros."""

# The longest actor, action and subject the log stores; filters and appends are checked against them.
ACTOR_MAX = 64
ACTION_MAX = 64
SUBJECT_MAX = 128

# How far verify_chain looks around a break to tell what kind of break it is. Detection never depends on
# these windows (any break is found); only the label does, and only for tampering spread over thousands of
# events. They bound memory, so a log of any length can be verified in one pass.
_LOOK_BACK = 10_000
_LOOK_AHEAD = 10_000
_RENUMBER_SEARCH = 1_000


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One entry of the append-only audit log.

    ``details`` adds context by name (``{"reason": "card lost"}``). It must never hold holder names, phone
    numbers, secrets or full customer numbers: callers pass masked numbers and key ids only, because the log
    is kept forever, is read by auditors, and cannot be redacted without breaking the chain.
    """

    sequence: int
    occurred_at: datetime
    actor: str
    action: str
    subject: str
    details: Mapping[str, str]
    previous_hash: str
    hash: str

    def __post_init__(self) -> None:
        # A read-only copy: an event that could change after its hash was computed would defeat the point.
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))

    def computed_hash(self) -> str:
        """The hash this event's content gives; equal to ``hash`` unless the event was altered."""
        return event_hash(
            self.sequence,
            self.occurred_at,
            self.actor,
            self.action,
            self.subject,
            self.details,
            self.previous_hash,
        )


class AuditProblem(enum.Enum):
    """The kind of break :func:`verify_chain` found."""

    NONE = "none"
    EDITED = "edited"
    DELETED = "deleted"
    INSERTED = "inserted"
    REORDERED = "reordered"


@dataclass(frozen=True, slots=True)
class ChainReport:
    """The outcome of a verification. ``first_bad_sequence`` is 0 and ``problem`` NONE when intact.

    ``detail`` is a sentence for people; it names sequences only, never an event's content.
    """

    intact: bool
    entries_checked: int
    first_bad_sequence: int
    problem: AuditProblem
    detail: str


@dataclass(frozen=True, slots=True)
class ChainHead:
    """Where the log says it ends: the sequence and hash of its last event (0 and genesis when empty)."""

    sequence: int
    hash: str


class AuditLog(Protocol):
    """Where audit events live; implemented by ``posguard_server.store.SqlAuditStore``."""

    def append(
        self, *, actor: str, action: str, subject: str, details: Mapping[str, str], now: datetime
    ) -> AuditEvent: ...

    def list(
        self,
        *,
        action: str | None = None,
        actor: str | None = None,
        subject: str | None = None,
        occurred_after: datetime | None = None,
        occurred_before: datetime | None = None,
        limit: int,
        after: int | None = None,
    ) -> tuple[list[AuditEvent], int | None]: ...

    def verify(self, from_sequence: int = 0) -> ChainReport: ...


def canonical_time(moment: datetime) -> str:
    """``2025-03-01T12:30:15.123456Z``: UTC, always with microseconds, so one instant has one spelling."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        # A naive time could be read as local or UTC, and the two readings hash differently.
        raise ValueError("audit timestamps must be timezone-aware")
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def canonical_details(details: Mapping[str, str]) -> str:
    """The details as compact JSON with sorted keys: equal mappings give equal text, whatever their order."""
    return _canonical(_text_only(details))


def _text_only(details: Mapping[str, str]) -> dict[str, str]:
    for key, value in details.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("audit details map text to text")
    return dict(details)


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def event_hash(
    sequence: int,
    occurred_at: datetime,
    actor: str,
    action: str,
    subject: str,
    details: Mapping[str, str],
    previous_hash: str,
) -> str:
    """SHA-256 (64 lower-case hex characters) over a canonical encoding of every field of an event.

    The encoding is JSON with sorted keys, fixed separators and ASCII escapes, which quotes and escapes
    every string: no two different events encode alike (concatenating raw fields would let ``"ab"+"c"``
    collide with ``"a"+"bc"``). The sequence is covered too, so moving an event changes its hash. This
    format is frozen: changing it would make every stored event fail verification.
    """
    payload = {
        "sequence": sequence,
        "occurred_at": canonical_time(occurred_at),
        "actor": actor,
        "action": action,
        "subject": subject,
        # Nested in the payload as the mapping itself: the one encoding sorts and escapes it as
        # canonical_details does (test_the_encoding_is_frozen holds it to earlier releases' hashes).
        "details": _text_only(details),
        "previous_hash": previous_hash,
    }
    return hashlib.sha256(_canonical(payload).encode("ascii")).hexdigest()


def make_event(
    *,
    sequence: int,
    occurred_at: datetime,
    actor: str,
    action: str,
    subject: str,
    details: Mapping[str, str],
    previous_hash: str,
) -> AuditEvent:
    """A new event chained to ``previous_hash``, with its hash computed."""
    occurred_at = occurred_at.astimezone(UTC)
    digest = event_hash(sequence, occurred_at, actor, action, subject, details, previous_hash)
    return AuditEvent(sequence, occurred_at, actor, action, subject, details, previous_hash, digest)


def verify_chain(
    events: Iterable[AuditEvent],
    *,
    start_previous_hash: str = GENESIS_HASH,
    start_sequence: int = 1,
    head: ChainHead | None = None,
) -> ChainReport:
    """Check a chain in one pass and report the first break, naming its kind and sequence.

    ``events`` must come in the order they are stored (by sequence). Checking starts at ``start_sequence``,
    whose event must link to ``start_previous_hash``. With ``head``, the chain must also end exactly there.

    An event is accepted when its sequence follows the previous one, its ``previous_hash`` is the previous
    event's hash, and its stored hash equals the recomputed one. At the first event ``C`` that fails, with
    ``P`` the last accepted event, the break is classified by the first rule that fits:

    1. REORDERED at P+1: ``C`` links to an event that comes *after* it (e.g. two events swapped places).
    2. INSERTED at C: ``C`` lies past the head the log recorded for its last append.
    3. DELETED at P+1: a sequence number is missing (the log jumps from P to C).
    4. ``C`` links to ``P`` but fails its hash: EDITED at C (its content was changed); or, if its sequence
       does not advance, REORDERED at C.
    5. INSERTED after E: ``C`` links to an earlier event ``E`` other than ``P``, so the events after ``E`` up
       to ``P`` are not part of the chain. (A link that skips back never means a deletion: the sequence
       covered by every hash makes a removed event show as a gap, rule 3, or as rule 7.)
    6. INSERTED at C: ``C`` links to nothing known, and the event after it links to ``P``: ``C`` was slipped
       in between them.
    7. DELETED at C: ``C``'s hash verifies under a higher sequence number: events were removed and the rest
       renumbered to close the gap.
    8. EDITED otherwise: at P if ``C`` is intact but does not link to ``P`` (one of the two was rewritten and
       its hash recomputed), at C if ``C`` itself fails its hash.

    After the last event, with ``head``: a log ending before the head is DELETED (its tail was cut off); a
    last event whose hash differs from the head's is EDITED.
    """
    stream = iter(events)
    previous_hash = start_previous_hash
    previous_sequence = start_sequence - 1
    accepted = 0
    # Hashes of recently accepted events, to recognise a link that skips back (rule 5).
    earlier: dict[str, int] = {}
    earlier_order: deque[str] = deque()
    for event in stream:
        expected = previous_sequence + 1
        if (
            event.sequence == expected
            and event.previous_hash == previous_hash
            and (head is None or event.sequence <= head.sequence)
            and event.computed_hash() == event.hash
        ):
            accepted += 1
            earlier[event.hash] = event.sequence
            earlier_order.append(event.hash)
            if len(earlier_order) > _LOOK_BACK:
                earlier.pop(earlier_order.popleft(), None)
            previous_hash, previous_sequence = event.hash, event.sequence
            continue
        # The first break ends the check; reading a little further tells what kind of break it is.
        return _classify(
            event,
            list(islice(stream, _LOOK_AHEAD)),
            previous_sequence=previous_sequence,
            previous_hash=previous_hash,
            previous_is_event=accepted > 0,
            earlier=earlier,
            head=head,
            checked=accepted + 1,
        )
    if head is not None:
        if previous_sequence < head.sequence:
            return _broken(
                AuditProblem.DELETED,
                previous_sequence + 1,
                accepted,
                f"the log {_ends(previous_sequence)} but its head records event {head.sequence}: "
                f"{_span(previous_sequence + 1, head.sequence)} removed",
            )
        if previous_sequence == head.sequence and previous_hash != head.hash:
            return _broken(
                AuditProblem.EDITED,
                head.sequence,
                accepted,
                f"event {head.sequence} does not match the hash the log's head records for it",
            )
    noun = "event" if accepted == 1 else "events"
    return ChainReport(
        intact=True,
        entries_checked=accepted,
        first_bad_sequence=0,
        problem=AuditProblem.NONE,
        detail=f"the chain is intact: {accepted} {noun} checked",
    )


def _classify(
    event: AuditEvent,
    later: list[AuditEvent],
    *,
    previous_sequence: int,
    previous_hash: str,
    previous_is_event: bool,
    earlier: Mapping[str, int],
    head: ChainHead | None,
    checked: int,
) -> ChainReport:
    """Name the break at ``event``, the first event that failed; the numbers are the rules of verify_chain."""
    seq = event.sequence
    expected = previous_sequence + 1
    link = event.previous_hash
    later_by_hash = {e.hash: e.sequence for e in later}
    links_to_previous = link == previous_hash

    def broken(problem: AuditProblem, sequence: int, detail: str) -> ChainReport:
        return _broken(problem, sequence, checked, detail)

    if not links_to_previous and link in later_by_hash:  # 1
        return broken(
            AuditProblem.REORDERED,
            min(seq, expected),
            f"event {seq} links to event {later_by_hash[link]}, which comes after it: the events are out "
            "of order",
        )
    if head is not None and seq > head.sequence and expected > head.sequence:  # 2
        return broken(
            AuditProblem.INSERTED,
            seq,
            f"event {seq} lies past the log's head (event {head.sequence}): it was not appended to the log",
        )
    if seq > expected:  # 3
        last = f"event {previous_sequence}" if previous_sequence >= 1 else "the start"
        return broken(
            AuditProblem.DELETED,
            expected,
            f"event {expected} is missing: the log goes from {last} to event {seq}",
        )
    if links_to_previous:  # 4
        if seq < expected:
            return broken(AuditProblem.REORDERED, seq, f"event {seq} comes after event {previous_sequence}")
        return broken(AuditProblem.EDITED, seq, f"event {seq} does not match its hash")
    if link in earlier:  # 5
        target = earlier[link]
        return broken(
            AuditProblem.INSERTED,
            target + 1,
            f"event {seq} links back to event {target}: {_span(target + 1, previous_sequence)} inserted "
            "into the chain",
        )
    following = later[0] if later else None
    if following is not None and following.previous_hash == previous_hash:  # 6
        return broken(
            AuditProblem.INSERTED,
            seq,
            f"event {seq} does not belong to the chain: event {following.sequence} links to "
            f"{_name(previous_sequence, previous_is_event)} before it",
        )
    if event.computed_hash() != event.hash:
        original = _original_sequence(event)
        if original is not None:  # 7
            return broken(
                AuditProblem.DELETED,
                seq,
                f"events are missing before event {seq}: it was numbered {original} when it was appended",
            )
        return broken(AuditProblem.EDITED, seq, f"event {seq} does not match its hash")  # 8
    if previous_is_event:  # 8
        return broken(
            AuditProblem.EDITED,
            previous_sequence,
            f"event {seq} does not link to event {previous_sequence}: one of them was rewritten and its "
            "hash recomputed",
        )
    return broken(
        AuditProblem.EDITED,
        seq,
        f"event {seq} does not link to {_name(previous_sequence, previous_is_event)}: it was rewritten "
        "and its hash recomputed",
    )


def _original_sequence(event: AuditEvent) -> int | None:
    """The higher sequence under which ``event``'s hash verifies, if it was renumbered downwards."""
    for candidate in range(event.sequence + 1, event.sequence + 1 + _RENUMBER_SEARCH):
        if replace(event, sequence=candidate).computed_hash() == event.hash:
            return candidate
    return None


def _ends(sequence: int) -> str:
    return f"ends at event {sequence}" if sequence >= 1 else "is empty"


def _span(first: int, last: int) -> str:
    """``event 7 was`` or ``events 7 to 9 were``: the subject of a sentence about a run of events."""
    return f"event {first} was" if first == last else f"events {first} to {last} were"


def _name(sequence: int, is_event: bool) -> str:
    if is_event:
        return f"event {sequence}"
    return "the start of the log" if sequence < 1 else f"the event before it ({sequence})"


def _broken(problem: AuditProblem, sequence: int, checked: int, detail: str) -> ChainReport:
    return ChainReport(
        intact=False,
        entries_checked=checked,
        first_bad_sequence=sequence,
        problem=problem,
        detail=detail,
    )
