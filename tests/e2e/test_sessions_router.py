"""Sessions compaction through the real router (its simulated provider, model alias `budget`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ballast.sessions.v1 import sessions_pb2

from tests.conftest import SuiteFactory
from tests.contract.sessions.helpers import assistant_turn, caller, user_turn
from tests.support.suite_config import write_test_config


async def test_compaction_folds_turns_through_the_router(suite_factory: SuiteFactory, tmp_path: Path) -> None:
    environ = write_test_config(tmp_path, sim_latency_ms=1.0)
    environ.update(
        {
            "BALLAST_SESSIONS_COMPACTION": "true",
            "BALLAST_SESSIONS_COMPACT_THRESHOLD_TOKENS": "200",
            "BALLAST_SESSIONS_COMPACT_KEEP_TOKENS": "60",
        }
    )
    suite = await suite_factory(["router", "sessions"], environ)
    stub = suite.sessions
    await stub.CreateSession(sessions_pb2.CreateSessionRequest(caller=caller(), session_id="s1"))
    for i in range(12):
        await stub.AppendTurns(
            sessions_pb2.AppendTurnsRequest(
                caller=caller(),
                session_id="s1",
                expected_version=-1,
                turns=[
                    user_turn(f"question {i} about the trip to Lisbon"),
                    assistant_turn(f"answer {i}: take the train"),
                ],
            )
        )
    # The background pass runs without blocking the appends; wait for it to land.
    session = sessions_pb2.Session()
    for _ in range(100):
        reply = await stub.GetSession(sessions_pb2.GetSessionRequest(caller=caller(), session_id="s1"))
        session = reply.session
        if session.summarized_turns:
            break
        await asyncio.sleep(0.05)
    assert session.summarized_turns > 0 and session.counters.turns == 24
    ctx = await stub.GetContext(
        sessions_pb2.GetContextRequest(caller=caller(), session_id="s1", token_budget=10_000)
    )
    assert ctx.summary.startswith("[simulated") and ctx.summary_tokens > 0
    assert ctx.turns[0].seq == session.summarized_turns + 1 and ctx.turns[-1].seq == 24
    # The full history stays readable.
    history = await stub.ListTurns(sessions_pb2.ListTurnsRequest(caller=caller(), session_id="s1"))
    assert [t.seq for t in history.turns] == list(range(1, 25))
    # CompactSession folds the rest now, down to the keep size.
    forced = await stub.CompactSession(sessions_pb2.CompactSessionRequest(caller=caller(), session_id="s1"))
    assert forced.session.summarized_turns >= session.summarized_turns
