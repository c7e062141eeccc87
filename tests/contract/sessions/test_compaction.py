"""Compaction with a deterministic in-test summariser, on the memory store and PostgreSQL.

The production summariser calls the router; here a summariser that spells out what it
folded lets the tests check exactly which turns went into the summary.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import grpc
import pytest
from ballast.common.v1 import common_pb2
from ballast.sessions.v1 import sessions_pb2, sessions_pb2_grpc

from services.kit.config import Env
from services.kit.server import RunningService, start_service
from services.kit.telemetry import setup_telemetry
from services.sessions.app import SessionsApp
from services.sessions.config import SessionsSettings
from services.sessions.model import Scope
from tests.contract.sessions.helpers import caller, tool_call_turn, tool_result_turn, user_turn

if TYPE_CHECKING:
    from ballast.sessions.v1.sessions_pb2_grpc import SessionsServiceAsyncStub


class SpellingSummariser:
    """'<previous> + [contents]'; can be held to show appends do not wait for it."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gate: asyncio.Event | None = None

    async def summarise(
        self, scope: Scope, previous: str, messages: Sequence[common_pb2.ChatMessage], max_tokens: int
    ) -> str:
        contents = [m.content or ",".join(c.name for c in m.tool_calls) for m in messages]
        self.calls.append(contents)
        if self.gate is not None:
            await self.gate.wait()
        return (previous + " " if previous else "") + "[" + "|".join(contents) + "]"


@pytest.fixture
def summariser() -> SpellingSummariser:
    return SpellingSummariser()


@pytest.fixture
async def service(store_url: str, summariser: SpellingSummariser) -> AsyncIterator[RunningService]:
    environ = {
        "BALLAST_SESSIONS_PORT": "0",
        "BALLAST_SESSIONS_STORE": store_url,
        # Each test turn "tN" counts 5 tokens (3 of message overhead + 2).
        "BALLAST_SESSIONS_COMPACT_THRESHOLD_TOKENS": "40",
        "BALLAST_SESSIONS_COMPACT_KEEP_TOKENS": "15",
        "OTEL_SDK_DISABLED": "true",
    }
    env = Env(environ)
    settings = SessionsSettings.from_env(env)
    env.check()
    app = SessionsApp(settings, setup_telemetry("sessions", environ=environ), summariser=summariser)
    running = await start_service(app)
    yield running
    await running.stop(0)


@pytest.fixture
async def stub(service: RunningService) -> AsyncIterator[SessionsServiceAsyncStub]:
    channel = grpc.aio.insecure_channel(service.address)
    yield sessions_pb2_grpc.SessionsServiceStub(channel)
    await channel.close()


async def _idle(service: RunningService) -> None:
    assert isinstance(service.app, SessionsApp)
    await service.app.sessions.compactor.wait_idle()


async def _append(
    stub: SessionsServiceAsyncStub, *turns: sessions_pb2.Turn
) -> sessions_pb2.AppendTurnsResponse:
    reply: sessions_pb2.AppendTurnsResponse = await stub.AppendTurns(
        sessions_pb2.AppendTurnsRequest(
            caller=caller(), session_id="s1", expected_version=-1, turns=list(turns)
        )
    )
    return reply


async def _context(stub: SessionsServiceAsyncStub, budget: int = 100_000) -> sessions_pb2.GetContextResponse:
    reply: sessions_pb2.GetContextResponse = await stub.GetContext(
        sessions_pb2.GetContextRequest(caller=caller(), session_id="s1", token_budget=budget)
    )
    return reply


async def test_background_compaction_folds_old_turns_and_keeps_history(
    service: RunningService, stub: SessionsServiceAsyncStub, summariser: SpellingSummariser
) -> None:
    await stub.CreateSession(sessions_pb2.CreateSessionRequest(caller=caller(), session_id="s1"))
    for i in range(1, 9):
        reply = await _append(stub, user_turn(f"t{i}"))
        assert reply.turns[0].token_count == 5
    # 8 turns = 40 tokens: not past the threshold yet.
    await _idle(service)
    assert summariser.calls == []
    await _append(stub, user_turn("t9"))
    await _idle(service)
    # 45 tokens; fold until at most 15 stay: t1..t6 go, t7..t9 stay.
    assert summariser.calls == [["t1", "t2", "t3", "t4", "t5", "t6"]]
    ctx = await _context(stub)
    assert ctx.summary == "[t1|t2|t3|t4|t5|t6]" and ctx.summary_tokens > 3
    assert [t.message.content for t in ctx.turns] == ["t7", "t8", "t9"] and ctx.omitted_turns == 0
    assert ctx.total_tokens == ctx.summary_tokens + 15
    session = await stub.GetSession(sessions_pb2.GetSessionRequest(caller=caller(), session_id="s1"))
    assert session.session.summarized_turns == 6 and session.session.version == 9
    history = await stub.ListTurns(sessions_pb2.ListTurnsRequest(caller=caller(), session_id="s1"))
    assert [t.message.content for t in history.turns] == [f"t{i}" for i in range(1, 10)]


async def test_appends_do_not_wait_and_turns_appended_meanwhile_survive(
    service: RunningService, stub: SessionsServiceAsyncStub, summariser: SpellingSummariser
) -> None:
    await stub.CreateSession(sessions_pb2.CreateSessionRequest(caller=caller(), session_id="s1"))
    summariser.gate = asyncio.Event()
    for i in range(1, 10):
        await _append(stub, user_turn(f"t{i}"))
    await asyncio.sleep(0.05)
    assert len(summariser.calls) == 1  # running and held
    for i in range(10, 15):
        await asyncio.wait_for(_append(stub, user_turn(f"t{i}")), 2)
    ctx = await _context(stub)
    assert ctx.summary == "" and len(ctx.turns) == 14
    summariser.gate.set()
    await _idle(service)
    ctx = await _context(stub)
    assert ctx.summary == "[t1|t2|t3|t4|t5|t6]"
    # Nothing appended while the summariser ran was lost: the summary covers 1-6 and the window 7-14.
    assert [t.message.content for t in ctx.turns] == [f"t{i}" for i in range(7, 15)]
    assert ctx.omitted_turns == 0 and ctx.version == 14


async def test_compaction_never_separates_a_tool_call_from_its_results(
    service: RunningService, stub: SessionsServiceAsyncStub, summariser: SpellingSummariser
) -> None:
    await stub.CreateSession(sessions_pb2.CreateSessionRequest(caller=caller(), session_id="s1"))
    await _append(stub, *(user_turn(f"t{i}") for i in range(1, 5)))
    await _append(
        stub,
        tool_call_turn(("c1", "f", "{}")),
        tool_result_turn("c1", "r1"),
        tool_result_turn("c1", "r2"),
        tool_result_turn("c1", "r3"),
        user_turn("t9"),
    )
    reply = await stub.CompactSession(sessions_pb2.CompactSessionRequest(caller=caller(), session_id="s1"))
    folded = reply.session.summarized_turns
    # The call is turn 5 and its results 6-8: a cut may fall before 5 or after 8, never between.
    assert folded not in (5, 6, 7) and folded > 0
    ctx = await _context(stub)
    assert ctx.turns[0].message.role != common_pb2.ROLE_TOOL


async def test_compact_session_forces_a_pass_below_the_threshold(
    stub: SessionsServiceAsyncStub, summariser: SpellingSummariser
) -> None:
    await stub.CreateSession(sessions_pb2.CreateSessionRequest(caller=caller(), session_id="s1"))
    await _append(stub, *(user_turn(f"t{i}") for i in range(1, 6)))
    reply = await stub.CompactSession(sessions_pb2.CompactSessionRequest(caller=caller(), session_id="s1"))
    assert reply.session.summarized_turns == 2 and summariser.calls == [["t1", "t2"]]
    again = await stub.CompactSession(sessions_pb2.CompactSessionRequest(caller=caller(), session_id="s1"))
    assert again.session.summarized_turns == 2 and len(summariser.calls) == 1
