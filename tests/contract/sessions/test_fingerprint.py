"""An idempotency key bound to a request fingerprint replays the original append even when the
turns differ (the edge's retried chat gets a different model answer), on memory and PostgreSQL."""

from __future__ import annotations

import grpc
import pytest
from ballast.sessions.v1 import sessions_pb2

from services.testing import Suite
from tests.contract.sessions.helpers import assistant_turn, caller, stub, user_turn


async def test_a_fingerprinted_key_replays_the_original_turns(suite: Suite) -> None:
    sessions = stub(suite)
    session_id = (
        await sessions.CreateSession(sessions_pb2.CreateSessionRequest(caller=caller()))
    ).session.session_id

    def append(answer: str, fingerprint: str) -> sessions_pb2.AppendTurnsRequest:
        return sessions_pb2.AppendTurnsRequest(
            caller=caller(),
            session_id=session_id,
            expected_version=0,
            idempotency_key="chat-1",
            request_fingerprint=fingerprint,
            turns=[user_turn("hello"), assistant_turn(answer)],
        )

    first = await sessions.AppendTurns(append("first answer", "fp-hello"))
    retried = await sessions.AppendTurns(append("a different answer", "fp-hello"))
    assert retried.replayed and not first.replayed
    assert [t.message.content for t in retried.turns] == ["hello", "first answer"]
    assert retried.session.version == first.session.version == 1
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await sessions.AppendTurns(append("first answer", "fp-another-request"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("idempotency_key:")
