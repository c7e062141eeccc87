"""Float seconds to Duration and Timestamp: the same values the well-known types' own helpers give."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import duration_pb2, timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from services.kit.protos import duration, seconds, timestamp


@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_durations_match_the_well_known_type(nanos: int) -> None:
    expected = duration_pb2.Duration()
    expected.FromNanoseconds(nanos)
    built = duration(nanos / 1e9)
    assert abs(built.ToNanoseconds() - nanos) <= max(1, abs(nanos) // 10**15)  # float rounding only
    assert (built.seconds >= 0 and built.nanos >= 0) or (built.seconds <= 0 and built.nanos <= 0)


def test_a_duration_reads_back_as_seconds() -> None:
    assert duration(1.5) == duration_pb2.Duration(seconds=1, nanos=500_000_000)
    assert duration(-1.5) == duration_pb2.Duration(seconds=-1, nanos=-500_000_000)
    assert seconds(duration(2.25)) == 2.25


def test_timestamps_round_to_the_resolution_asked_for() -> None:
    moment = datetime(2026, 12, 6, 3, 40, 12, 345678, tzinfo=UTC)
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(moment)
    assert timestamp(moment.timestamp(), resolution_ns=1000) == expected
    assert timestamp(-0.25) == timestamp_pb2.Timestamp(seconds=-1, nanos=750_000_000)
