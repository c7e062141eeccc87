"""Sessions compaction through the real router (its simulated provider, model alias `budget`)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import httpx
from ballast.edge.v1 import edge_pb2
from ballast.sessions.v1 import sessions_pb2
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services import registry
from services.kit.config import SERVICE_NAMES, Env
from services.kit.server import RunningService, start_service
from services.kit.telemetry import setup_telemetry
from tests.conftest import SuiteFactory
from tests.contract.sessions.helpers import assistant_turn, caller, user_turn
from tests.e2e.test_telemetry import KEY, _user
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _router_on(port: int, environ: dict[str, str]) -> RunningService:
    """The real router on a chosen port (a suite picks free ports; this one must come back)."""
    env_vars = {**os.environ, **environ, "BALLAST_ROUTER_PORT": str(port), "BALLAST_ROUTER_METRICS_PORT": "0"}
    env = Env(env_vars)
    settings = registry.load_settings("router", env)
    env.check()
    return await start_service(
        registry.build_app("router", settings, setup_telemetry("router", environ=env_vars))
    )


async def test_router_down_is_flagged_and_the_session_converges_when_it_returns(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    environ = write_test_config(tmp_path, sim_latency_ms=1.0)
    port = _free_port()
    environ.update(
        {
            "BALLAST_ROUTER_ADDR": f"127.0.0.1:{port}",  # nothing listens there yet
            "BALLAST_SESSIONS_COMPACTION": "true",
            "BALLAST_SESSIONS_COMPACT_THRESHOLD_TOKENS": "200",
            "BALLAST_SESSIONS_COMPACT_KEEP_TOKENS": "60",
            "BALLAST_SESSIONS_SUMMARY_MAX_TOKENS": "100",
            "BALLAST_SESSIONS_COMPACT_TIMEOUT": "2s",
            # Real time here: retries come fast, and the test only polls for the outcome.
            "BALLAST_SESSIONS_COMPACT_RETRY_INITIAL": "50ms",
            "BALLAST_SESSIONS_COMPACT_RETRY_MAX": "200ms",
        }
    )
    suite = await suite_factory(["sessions"], environ)
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
                    assistant_turn(f"answer {i}: the train"),
                ],
            )
        )
    budget = sessions_pb2.GetContextRequest(caller=caller(), session_id="s1", token_budget=150)
    ctx = await stub.GetContext(budget)
    assert ctx.omitted_unsummarized and ctx.omitted_turns > 0 and not ctx.summary
    router = await _router_on(port, environ)
    try:
        # No append from here on: the sessions service's own retries must fold the tail.
        deadline = time.monotonic() + 60
        while True:
            ctx = await stub.GetContext(budget)
            if not ctx.omitted_unsummarized:
                break
            assert time.monotonic() < deadline, "the session never converged"
            await asyncio.sleep(0.05)
        assert ctx.summary.startswith("[simulated") and ctx.omitted_turns == 0
        session = (
            await stub.GetSession(sessions_pb2.GetSessionRequest(caller=caller(), session_id="s1"))
        ).session
        assert session.version == 12 and session.summarized_turns > 0
        assert ctx.turns[0].seq == session.summarized_turns + 1 and ctx.turns[-1].seq == 24
    finally:
        await router.stop(0)


async def test_the_edge_traces_and_counts_context_left_out_unsummarised(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    environ = {
        **write_test_config(tmp_path, sim_latency_ms=1.0),
        "OTEL_SDK_DISABLED": "false",
        "BALLAST_SESSIONS_COMPACTION": "true",
        # The router refuses this model, so no summary can be written.
        "BALLAST_SESSIONS_COMPACT_MODEL": "no-such-model",
    }
    suite = await suite_factory(SERVICE_NAMES, environ, span_processors=[SimpleSpanProcessor(exporter)])
    session = (await suite.edge.CreateSession(edge_pb2.CreateSessionRequest(), metadata=KEY)).session
    for n in range(4):
        await suite.edge.Chat(
            edge_pb2.ChatRequest(
                session_id=session.session_id,
                messages=[_user(f"Tell me about day {n} of the trip to Lisbon, in detail please.")],
                context_token_budget=60,
            ),
            metadata=KEY,
        )
    roots = [s for s in exporter.get_finished_spans() if s.name == "/ballast.edge.v1.EdgeService/Chat"]
    flagged = [
        int(str((s.attributes or {})["ballast.session.omitted_unsummarized_turns"]))
        for s in roots[1:]
        if "ballast.session.omitted_unsummarized_turns" in (s.attributes or {})
    ]
    assert flagged and all(n > 0 for n in flagged)
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{suite.running['edge'].metrics_port}/metrics")).text
    (line,) = [x for x in text.splitlines() if x.startswith("ballast_edge_context_omitted_unsummarized")]
    assert float(line.rsplit(" ", 1)[1]) == len(flagged)
