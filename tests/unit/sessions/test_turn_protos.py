"""A stored turn written into a response's repeated field in place is the Turn it always was:
the stored payload, then the store's seq, token count and creation time (microseconds)."""

from __future__ import annotations

from ballast.common.v1 import common_pb2
from ballast.sessions.v1 import sessions_pb2
from google.protobuf import timestamp_pb2

from services.sessions.model import StoredTurn
from services.sessions.turns import fill_proto, to_proto


def _stored(created_at: float) -> StoredTurn:
    payload = sessions_pb2.Turn(
        message=common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="How do I reset my password?"),
        # A time already in the payload is replaced whole, nanos included.
        created_at=timestamp_pb2.Timestamp(seconds=1, nanos=999),
    ).SerializeToString()
    return StoredTurn(seq=7, role=1, token_count=12, tool_calls=0, payload=payload, created_at=created_at)


def test_a_turn_filled_in_place_equals_the_turn_built_apart() -> None:
    for created_at in (1_765_000_000.1234567, 0.0, 1_765_000_000.0000004):
        stored = _stored(created_at)
        built = sessions_pb2.Turn.FromString(stored.payload)
        built.seq, built.token_count = 7, 12
        whole, micros = divmod(round(created_at * 1e6), 1_000_000)
        built.created_at.CopyFrom(timestamp_pb2.Timestamp(seconds=whole, nanos=micros * 1000))
        response = sessions_pb2.ListTurnsResponse()
        assert fill_proto(response.turns.add(), stored) == built
        assert response.turns[0] == built == to_proto(stored)
