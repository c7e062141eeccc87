"""Seconds as floats ↔ protobuf's Duration and Timestamp, in one place.

Domain code keeps time as float seconds (a clock's reading); messages carry the well-known
types. The values are built from their fields because the well-known types' own helpers
(`FromNanoseconds`, `ToNanoseconds`) are Python-level code on the upb backend, and a chat
converts a dozen of these on its way through the suite.
"""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2

_NANOS = 1_000_000_000


def duration_fields(seconds: float) -> dict[str, int]:
    """A Duration's fields, for a message built in place (`Message(delay={...})` copies nothing)."""
    nanos = int(seconds * 1e9)
    whole, fraction = divmod(abs(nanos), _NANOS)
    if nanos < 0:  # both fields carry the sign
        return {"seconds": -whole, "nanos": -fraction}
    return {"seconds": whole, "nanos": fraction}


def duration(seconds: float) -> duration_pb2.Duration:
    """A Duration of `seconds` (nanosecond resolution)."""
    return duration_pb2.Duration(**duration_fields(seconds))


def seconds(value: duration_pb2.Duration) -> float:
    """The Duration's length in seconds."""
    return value.seconds + value.nanos / 1e9


def timestamp(epoch_seconds: float, *, resolution_ns: int = 1) -> timestamp_pb2.Timestamp:
    """A Timestamp at `epoch_seconds`, rounded to `resolution_ns` (1000 for PostgreSQL's µs)."""
    return set_timestamp(timestamp_pb2.Timestamp(), epoch_seconds, resolution_ns=resolution_ns)


def set_timestamp(
    target: timestamp_pb2.Timestamp, epoch_seconds: float, *, resolution_ns: int = 1
) -> timestamp_pb2.Timestamp:
    """Sets `target` (a field of a message being built: no Timestamp copied into it) as
    timestamp() would make it."""
    nanos = round(epoch_seconds * 1e9 / resolution_ns) * resolution_ns
    target.seconds, target.nanos = divmod(nanos, _NANOS)  # a Timestamp's nanos are never negative
    return target
