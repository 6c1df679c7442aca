"""The audit log's hash chain as pure domain code: hashing, and what each kind of tampering looks like."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import pytest

from posguard_server.domain.audit import (
    GENESIS_HASH,
    AuditEvent,
    AuditProblem,
    ChainHead,
    event_hash,
    make_event,
    verify_chain,
)

T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def _chain(n: int = 10) -> list[AuditEvent]:
    events: list[AuditEvent] = []
    previous = GENESIS_HASH
    for sequence in range(1, n + 1):
        event = make_event(
            sequence=sequence,
            occurred_at=T0 + timedelta(seconds=sequence),
            actor=f"key{sequence % 3}",
            action="customer.suspended" if sequence % 2 else "api_key.created",
            subject=f"1564 **** **** **** {sequence:04d}",
            details={"reason": f"case {sequence}", "customer_id": f"c{sequence}"},
            previous_hash=previous,
        )
        events.append(event)
        previous = event.hash
    return events


def _head(events: list[AuditEvent]) -> ChainHead:
    return ChainHead(events[-1].sequence, events[-1].hash)


def _forge(sequence: int, previous_hash: str) -> AuditEvent:
    """An event with a correct hash of its own, as someone who knows the format could make."""
    return make_event(
        sequence=sequence,
        occurred_at=T0,
        actor="intruder",
        action="api_key.created",
        subject="deadbeef0000",
        details={"role": "admin"},
        previous_hash=previous_hash,
    )


def _renumber(events: list[AuditEvent], shift: int) -> list[AuditEvent]:
    # Changes the sequence column only, as an UPDATE in the database would: the stored hashes stay.
    return [dataclasses.replace(e, sequence=e.sequence + shift) for e in events]


def test_an_intact_chain_verifies() -> None:
    events = _chain(10)
    report = verify_chain(events, head=_head(events))
    assert report.intact
    assert report.entries_checked == 10
    assert report.first_bad_sequence == 0
    assert report.problem is AuditProblem.NONE
    assert "intact" in report.detail


def test_an_empty_chain_is_intact() -> None:
    report = verify_chain([], head=ChainHead(0, GENESIS_HASH))
    assert (report.intact, report.entries_checked, report.problem) == (True, 0, AuditProblem.NONE)


def test_the_first_event_links_to_genesis_and_each_next_to_the_one_before() -> None:
    events = _chain(3)
    assert events[0].previous_hash == GENESIS_HASH
    assert [e.previous_hash for e in events[1:]] == [e.hash for e in events[:-1]]
    assert all(len(e.hash) == 64 and e.hash == e.hash.lower() for e in events)


@pytest.mark.parametrize(
    "change",
    [
        {"actor": "someone else"},
        {"action": "api_key.revoked"},
        {"subject": "1564 **** **** **** 9999"},
        {"details": {"reason": "case 4", "customer_id": "c999"}},
        {"details": {"reason": "case 4"}},
        {"details": {"reason": "case 4", "customer_id": "c4", "extra": "x"}},
        {"occurred_at": T0 + timedelta(seconds=4, microseconds=1)},
        {"previous_hash": "f" * 64},
    ],
    ids=["actor", "action", "subject", "details-value", "details-removed", "details-added", "time", "link"],
)
def test_editing_any_field_of_one_event_is_edited_at_that_event(change: dict[str, object]) -> None:
    events = _chain(10)
    events[3] = dataclasses.replace(events[3], **change)  # type: ignore[arg-type]
    report = verify_chain(events, head=_head(events))
    assert not report.intact
    assert report.problem is AuditProblem.EDITED
    assert report.first_bad_sequence == 4
    assert report.entries_checked == 4
    assert "4" in report.detail


def test_an_edit_with_a_recomputed_hash_is_edited_where_the_link_breaks() -> None:
    events = _chain(10)
    original = events[3]
    events[3] = make_event(
        sequence=4,
        occurred_at=original.occurred_at,
        actor="someone else",
        action=original.action,
        subject=original.subject,
        details=original.details,
        previous_hash=original.previous_hash,
    )
    report = verify_chain(events, head=_head(events))
    assert report.problem is AuditProblem.EDITED
    assert report.first_bad_sequence == 4


def test_rewriting_the_last_event_is_caught_by_the_head() -> None:
    events = _chain(5)
    head = _head(events)
    events[-1] = _forge(5, events[3].hash)
    report = verify_chain(events, head=head)
    assert (report.problem, report.first_bad_sequence) == (AuditProblem.EDITED, 5)


@pytest.mark.parametrize("index", [0, 4, 9])
def test_deleting_one_event_is_deleted_at_its_sequence(index: int) -> None:
    events = _chain(10)
    head = _head(events)
    del events[index]
    report = verify_chain(events, head=head)
    assert not report.intact
    assert report.problem is AuditProblem.DELETED
    assert report.first_bad_sequence == index + 1
    assert f"event {index + 1}" in report.detail


def test_deleting_and_renumbering_the_rest_is_still_deleted() -> None:
    events = _chain(10)
    events = events[:4] + _renumber(events[5:], -1)
    report = verify_chain(events)
    assert (report.problem, report.first_bad_sequence) == (AuditProblem.DELETED, 5)


def test_a_tail_cut_off_is_deleted_only_the_head_can_tell() -> None:
    events = _chain(10)
    head = _head(events)
    assert verify_chain(events[:7]).intact  # without the head, a shorter chain is still a chain
    report = verify_chain(events[:7], head=head)
    assert (report.problem, report.first_bad_sequence) == (AuditProblem.DELETED, 8)
    assert report.entries_checked == 7


def test_a_forged_event_with_a_foreign_link_is_inserted() -> None:
    events = _chain(10)
    forged = _forge(5, "e" * 64)
    tampered = [*events[:4], forged, *_renumber(events[4:], +1)]
    report = verify_chain(tampered)
    assert not report.intact
    assert (report.problem, report.first_bad_sequence) == (AuditProblem.INSERTED, 5)


def test_a_forged_event_linked_into_the_chain_is_inserted() -> None:
    events = _chain(10)
    forged = _forge(5, events[3].hash)
    tampered = [*events[:4], forged, *_renumber(events[4:], +1)]
    report = verify_chain(tampered)
    assert (report.problem, report.first_bad_sequence) == (AuditProblem.INSERTED, 5)
    assert "event 6 links back to event 4" in report.detail


def test_a_forged_event_appended_past_the_head_is_inserted() -> None:
    events = _chain(10)
    head = _head(events)
    events.append(_forge(11, events[-1].hash))
    assert verify_chain(events).intact  # a perfect forgery at the end fools the chain alone
    report = verify_chain(events, head=head)
    assert (report.problem, report.first_bad_sequence) == (AuditProblem.INSERTED, 11)


@pytest.mark.parametrize(("first", "second"), [(3, 4), (0, 1), (2, 7), (8, 9)])
def test_swapping_two_events_is_reordered(first: int, second: int) -> None:
    events = _chain(10)
    a, b = events[first], events[second]
    # As in the database: the rows trade sequence numbers, everything else stays.
    events[first] = dataclasses.replace(b, sequence=a.sequence)
    events[second] = dataclasses.replace(a, sequence=b.sequence)
    report = verify_chain(events, head=_head(events))
    assert not report.intact
    assert (report.problem, report.first_bad_sequence) == (AuditProblem.REORDERED, first + 1)


def test_events_handed_over_out_of_order_are_reordered() -> None:
    events = _chain(6)
    events[2], events[3] = events[3], events[2]
    report = verify_chain(events)
    assert (report.problem, report.first_bad_sequence) == (AuditProblem.REORDERED, 3)


def test_verifying_from_the_middle_links_to_the_event_before() -> None:
    events = _chain(10)
    report = verify_chain(
        events[5:], start_previous_hash=events[4].hash, start_sequence=6, head=_head(events)
    )
    assert report.intact
    assert report.entries_checked == 5
    wrong = verify_chain(events[5:], start_previous_hash=GENESIS_HASH, start_sequence=6)
    assert not wrong.intact
    assert wrong.first_bad_sequence == 6


def test_the_hash_covers_every_field() -> None:
    base: dict[str, object] = {
        "sequence": 7,
        "occurred_at": T0,
        "actor": "a1",
        "action": "api_key.created",
        "subject": "k1",
        "details": {"role": "admin"},
        "previous_hash": GENESIS_HASH,
    }
    variants: list[dict[str, object]] = [
        {"sequence": 8},
        {"occurred_at": T0 + timedelta(microseconds=1)},
        {"actor": "a2"},
        {"action": "api_key.revoked"},
        {"subject": "k2"},
        {"details": {"role": "auditor"}},
        {"details": {"role": "admin", "name": "x"}},
        {"details": {}},
        {"previous_hash": "1" * 64},
    ]
    digests = {event_hash(**base)}  # type: ignore[arg-type]
    for change in variants:
        digests.add(event_hash(**{**base, **change}))  # type: ignore[arg-type]
    assert len(digests) == len(variants) + 1


def test_the_encoding_is_unambiguous() -> None:
    # Moving text from one field to the next, or into a details key, must change the hash.
    one = event_hash(1, T0, "ab", "c", "", {}, GENESIS_HASH)
    two = event_hash(1, T0, "a", "bc", "", {}, GENESIS_HASH)
    three = event_hash(1, T0, "a", "b", "", {"c": ""}, GENESIS_HASH)
    assert len({one, two, three}) == 3
    assert event_hash(1, T0, "a", "b", "", {"k": 'v","x":"y'}, GENESIS_HASH) != event_hash(
        1, T0, "a", "b", "", {"k": "v", "x": "y"}, GENESIS_HASH
    )


def test_details_order_does_not_matter() -> None:
    forwards = {"a": "1", "b": "2", "c": "3"}
    backwards = dict(reversed(forwards.items()))
    assert list(forwards) != list(backwards)
    assert event_hash(1, T0, "x", "y", "z", forwards, GENESIS_HASH) == event_hash(
        1, T0, "x", "y", "z", backwards, GENESIS_HASH
    )


def test_one_instant_in_any_time_zone_hashes_alike_and_naive_times_are_refused() -> None:
    plus_eight = T0.astimezone(timezone(timedelta(hours=8)))
    assert event_hash(1, T0, "x", "y", "z", {}, GENESIS_HASH) == event_hash(
        1, plus_eight, "x", "y", "z", {}, GENESIS_HASH
    )
    with pytest.raises(ValueError, match="timezone-aware"):
        event_hash(1, T0.replace(tzinfo=None), "x", "y", "z", {}, GENESIS_HASH)


def test_details_must_be_text_and_are_read_only() -> None:
    with pytest.raises(TypeError):
        event_hash(1, T0, "x", "y", "z", {"n": 1}, GENESIS_HASH)  # type: ignore[dict-item]
    source = {"reason": "lost"}
    event = make_event(
        sequence=1,
        occurred_at=T0,
        actor="x",
        action="y",
        subject="z",
        details=source,
        previous_hash=GENESIS_HASH,
    )
    source["reason"] = "changed later"
    assert event.details == {"reason": "lost"}
    with pytest.raises(TypeError):
        event.details["reason"] = "x"  # type: ignore[index]
    assert event.computed_hash() == event.hash


def test_the_detail_never_repeats_event_content() -> None:
    events = _chain(6)
    events[2] = dataclasses.replace(events[2], details={"reason": "SECRET-HOLDER-NAME"})
    report = verify_chain(events)
    assert report.problem is AuditProblem.EDITED
    assert "SECRET" not in report.detail
    assert "1564" not in report.detail


def test_the_encoding_is_frozen() -> None:
    """Hashes computed by earlier releases, which every stored log holds: they must not change."""
    assert _chain(3)[-1].hash == "7e9d82015dc868e5fa62f47359c98b1331aa1bc946fb86c60e0759be8760c9d3"
    details = {"reason": 'lost "card" \u00e9\\n', "b": ""}  # quotes, a non-ASCII letter, a backslash
    assert (
        event_hash(7, T0, "k\u00e9y", "customer.suspended", "1564 **** **** **** 0007", details, GENESIS_HASH)
        == "0d2ef3a9cb4269b4fb448a907775d7c3f479e0004c0e36738d195d8863dd29a7"
    )
