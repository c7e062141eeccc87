"""Conversions between wire turns (ballast.common/sessions protobuf) and stored turns."""

from __future__ import annotations

from ballast.common.v1 import common_pb2
from ballast.sessions.v1 import sessions_pb2
from google.protobuf import timestamp_pb2

from services.kit import protos
from services.sessions.model import ROLE_ASSISTANT, NewTurn, StoredTurn
from services.sessions.tokens import MessageParts, Tokenizer


def message_parts(message: common_pb2.ChatMessage) -> MessageParts:
    return MessageParts(
        content=message.content,
        name=message.name,
        tool_calls=tuple((call.name, call.arguments_json) for call in message.tool_calls)
        if message.tool_calls
        else (),
        tool_call_id=message.tool_call_id,
    )


def new_turn(turn: sessions_pb2.Turn, tokenizer: Tokenizer) -> NewTurn:
    """A turn ready to store: token count computed when 0, seq and created_at left to the store."""
    stored = sessions_pb2.Turn()
    stored.CopyFrom(turn)
    stored.ClearField("seq")
    stored.ClearField("created_at")
    if stored.token_count <= 0:
        stored.token_count = tokenizer.count_message(message_parts(stored.message))
    tool_calls = len(stored.message.tool_calls) if stored.message.role == ROLE_ASSISTANT else 0
    return NewTurn(
        role=int(stored.message.role),
        token_count=stored.token_count,
        tool_calls=tool_calls,
        input_tokens=stored.usage.input_tokens,
        output_tokens=stored.usage.output_tokens,
        cost_micros=stored.cost_micros,
        payload=stored.SerializeToString(),
    )


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    # Microseconds, as PostgreSQL stores them: the memory store answers exactly as PostgreSQL does.
    return protos.timestamp(seconds, resolution_ns=1000)


def to_proto(turn: StoredTurn) -> sessions_pb2.Turn:
    return fill_proto(sessions_pb2.Turn(), turn)


def fill_proto(out: sessions_pb2.Turn, turn: StoredTurn) -> sessions_pb2.Turn:
    """Writes `turn` into `out`, an empty Turn: an element added to a response's repeated field
    is filled in place rather than built apart and copied in (a context window is every call)."""
    out.MergeFromString(turn.payload)
    out.seq = turn.seq
    out.token_count = turn.token_count
    # Microseconds, as PostgreSQL stores them (see timestamp()).
    protos.set_timestamp(out.created_at, turn.created_at, resolution_ns=1000)
    return out
