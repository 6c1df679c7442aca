"""Times to and from protobuf Timestamps, by arithmetic: the values protobuf's own conversions give."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from posguard_server.api.convert import timestamp, to_datetime

_ZONES = st.sampled_from(
    [None, UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-11))]
)


def _protobuf(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


@given(st.datetimes(timezones=_ZONES))
def test_a_time_becomes_the_timestamp_protobuf_makes(value: datetime) -> None:
    # Naive times are UTC to both; times near the years 1 and 9999 in other zones included.
    try:
        expected = _protobuf(value)
    except ValueError:  # a zone's offset takes it outside the years 1 to 9999
        return
    assert timestamp(value) == expected


@given(
    st.integers(min_value=-62_135_596_800, max_value=253_402_300_799),
    st.integers(min_value=0, max_value=999_999_999),
)
def test_a_timestamp_becomes_the_time_protobuf_makes(seconds: int, nanos: int) -> None:
    stamp = Timestamp(seconds=seconds, nanos=nanos)
    value = to_datetime(stamp)
    assert value == stamp.ToDatetime(tzinfo=UTC)
    assert value.tzinfo is UTC


def test_the_ends_of_the_range() -> None:
    first = datetime(1, 1, 1, tzinfo=UTC)
    last = datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    assert to_datetime(timestamp(first) or Timestamp()) == first
    assert to_datetime(timestamp(last) or Timestamp()) == last
    assert timestamp(None) is None


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(-62_135_596_801, 0), (253_402_300_800, 0), (0, -1), (0, 1_000_000_000)],
)
def test_a_timestamp_out_of_range_is_refused_as_protobuf_refuses_it(seconds: int, nanos: int) -> None:
    stamp = Timestamp(seconds=seconds, nanos=nanos)
    with pytest.raises(ValueError, match="Timestamp"):
        stamp.ToDatetime(tzinfo=UTC)
    with pytest.raises(ValueError, match="outside the years 1 to 9999"):
        to_datetime(stamp)
