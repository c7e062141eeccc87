"""Another tenant, or another user of the same tenant, never sees or changes a session."""

from __future__ import annotations

import grpc
import pytest
from ballast.common.v1 import common_pb2
from ballast.sessions.v1 import sessions_pb2

from services.testing import Suite
from tests.contract.sessions.helpers import caller, stub, user_turn

OWNER = caller("tenant-a", "alice")
STRANGERS = [caller("tenant-b", "alice"), caller("tenant-a", "bob"), caller("tenant-b", "bob")]


def _requests(who: common_pb2.Caller, sid: str) -> dict[str, object]:
    return {
        "GetSession": sessions_pb2.GetSessionRequest(caller=who, session_id=sid),
        "DeleteSession": sessions_pb2.DeleteSessionRequest(caller=who, session_id=sid),
        "AppendTurns": sessions_pb2.AppendTurnsRequest(
            caller=who,
            session_id=sid,
            expected_version=-1,
            idempotency_key="k1",
            turns=[user_turn("intrude")],
        ),
        "ListTurns": sessions_pb2.ListTurnsRequest(caller=who, session_id=sid),
        "GetContext": sessions_pb2.GetContextRequest(caller=who, session_id=sid, token_budget=1000),
        "CompactSession": sessions_pb2.CompactSessionRequest(caller=who, session_id=sid),
    }


@pytest.mark.parametrize("stranger", STRANGERS, ids=["other-tenant", "other-user", "both"])
async def test_a_stranger_gets_not_found_and_changes_nothing(
    suite: Suite, stranger: common_pb2.Caller
) -> None:
    await stub(suite).CreateSession(sessions_pb2.CreateSessionRequest(caller=OWNER, session_id="s1"))
    owner_append = await stub(suite).AppendTurns(
        sessions_pb2.AppendTurnsRequest(
            caller=OWNER,
            session_id="s1",
            expected_version=0,
            idempotency_key="k1",
            turns=[user_turn("secret")],
        )
    )
    for rpc, request in _requests(stranger, "s1").items():
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await getattr(suite.sessions, rpc)(request)
        # The same answer as for an id that does not exist at all: existence is not revealed.
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, rpc
        assert "secret" not in (info.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await getattr(suite.sessions, rpc)(_requests(stranger, "no-such")[rpc])
        assert missing.value.code() == info.value.code() and missing.value.details() == (
            info.value.details() or ""
        ).replace("s1", "no-such"), rpc
    listed = await stub(suite).ListSessions(sessions_pb2.ListSessionsRequest(caller=stranger))
    assert not listed.sessions
    deleted = await stub(suite).DeleteUserData(sessions_pb2.DeleteUserDataRequest(caller=stranger))
    assert deleted.deleted_sessions == 0
    # A stranger may use the same session id for their own session: it is a different one.
    mine = await stub(suite).CreateSession(
        sessions_pb2.CreateSessionRequest(caller=stranger, session_id="s1")
    )
    assert mine.session.version == 0 and mine.session.counters.turns == 0
    # The owner's session is untouched.
    session = (
        await stub(suite).GetSession(sessions_pb2.GetSessionRequest(caller=OWNER, session_id="s1"))
    ).session
    assert session.version == owner_append.session.version == 1 and session.counters.turns == 1
    turns = await stub(suite).ListTurns(sessions_pb2.ListTurnsRequest(caller=OWNER, session_id="s1"))
    assert [t.message.content for t in turns.turns] == ["secret"]
    owned = await stub(suite).ListSessions(sessions_pb2.ListSessionsRequest(caller=OWNER))
    assert [s.session_id for s in owned.sessions] == ["s1"]
