"""Compaction with a deterministic in-test summariser, on the memory store and PostgreSQL.

The production summariser calls the router; here a summariser that spells out what it
folded lets the tests check exactly which turns went into the summary.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING

import grpc
import pytest
from ballast.common.v1 import common_pb2
from ballast.sessions.v1 import sessions_pb2, sessions_pb2_grpc

from services.kit.config import Env
from services.kit.errors import Unavailable
from services.kit.server import RunningService, start_service
from services.kit.telemetry import setup_telemetry
from services.sessions.app import SessionsApp
from services.sessions.compaction import Compactor
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


# Convergence: a requested compaction always compacts (or says why not), a pass re-checks the
# threshold when it ends, and a failing summariser is retried on a backoff without appends.


class ManualClock:
    """Time that moves only when the test says so; sleepers wake when it passes their deadline."""

    def __init__(self) -> None:
        self.now = time.time()
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + seconds, future))
        await future

    @property
    def sleeping(self) -> int:
        return sum(1 for _, future in self._sleepers if not future.done())

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for deadline, future in self._sleepers:
            if deadline <= self.now and not future.done():
                future.set_result(None)
        self._sleepers = [(d, f) for d, f in self._sleepers if not f.done()]


class RouterDown(SpellingSummariser):
    """The spelling summariser behind a router that can be switched off (as RouterSummariser fails)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.attempts = 0

    async def summarise(
        self, scope: Scope, previous: str, messages: Sequence[common_pb2.ChatMessage], max_tokens: int
    ) -> str:
        self.attempts += 1
        if self.down:
            raise Unavailable("summariser: router answered UNAVAILABLE: connection refused")
        return await super().summarise(scope, previous, messages, max_tokens)


async def _until(check: Callable[[], bool], what: str) -> None:
    """Polls with a generous deadline (the machine may be slow; nothing here is timed)."""
    deadline = time.monotonic() + 60
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def router() -> RouterDown:
    return RouterDown()


@pytest.fixture
def extra_env() -> dict[str, str]:
    return {}


@pytest.fixture
async def clocked(
    store_url: str, router: RouterDown, clock: ManualClock, extra_env: dict[str, str]
) -> AsyncIterator[RunningService]:
    environ = {
        "BALLAST_SESSIONS_PORT": "0",
        "BALLAST_SESSIONS_STORE": store_url,
        "BALLAST_SESSIONS_COMPACT_THRESHOLD_TOKENS": "40",
        "BALLAST_SESSIONS_COMPACT_KEEP_TOKENS": "15",
        # Small, so GetContext can ask for a pass that makes a small budget fit.
        "BALLAST_SESSIONS_SUMMARY_MAX_TOKENS": "16",
        "BALLAST_SESSIONS_COMPACT_RETRY_INITIAL": "10s",
        "BALLAST_SESSIONS_COMPACT_RETRY_MAX": "40s",
        "BALLAST_SESSIONS_CONTEXT_COMPACT_WAIT": "60s",
        "OTEL_SDK_DISABLED": "true",
        **extra_env,
    }
    env = Env(environ)
    settings = SessionsSettings.from_env(env)
    env.check()
    app = SessionsApp(
        settings,
        setup_telemetry("sessions", environ=environ),
        summariser=router,
        clock=clock,
        sleep=clock.sleep,
    )
    running = await start_service(app)
    yield running
    await running.stop(0)


@pytest.fixture
async def clocked_stub(clocked: RunningService) -> AsyncIterator[SessionsServiceAsyncStub]:
    channel = grpc.aio.insecure_channel(clocked.address)
    yield sessions_pb2_grpc.SessionsServiceStub(channel)
    await channel.close()


def _compactor(service: RunningService) -> Compactor:
    assert isinstance(service.app, SessionsApp)
    return service.app.sessions.compactor


def _covered(summary: str) -> list[str]:
    """The turn texts a spelled summary covers, in order ('[t1|t2] [t3]' → t1, t2, t3)."""
    return [text for part in summary.split() for text in part.strip("[]").split("|") if text]


async def test_compact_session_during_a_running_pass_compacts_and_no_turn_is_lost(
    clocked: RunningService, clocked_stub: SessionsServiceAsyncStub, router: RouterDown
) -> None:
    stub = clocked_stub
    await stub.CreateSession(sessions_pb2.CreateSessionRequest(caller=caller(), session_id="s1"))
    router.gate = asyncio.Event()
    for i in range(1, 10):
        await _append(stub, user_turn(f"t{i}"))
    await _until(lambda: len(router.calls) == 1, "the background pass to start")
    # While that pass is held, more turns arrive and a client asks for a compaction.
    for i in range(10, 21):
        await _append(stub, user_turn(f"t{i}"))
    requested = asyncio.ensure_future(
        stub.CompactSession(sessions_pb2.CompactSessionRequest(caller=caller(), session_id="s1"))
    )
    compactor = _compactor(clocked)
    await _until(lambda: compactor.waiting(Scope("t1", "u1"), "s1") == 1, "CompactSession to join the pass")
    assert not requested.done()  # it waits for a pass of its own instead of answering OK at once
    router.gate.set()
    reply = await requested
    # The held pass folded t1-t6; the requested one then folded down to the keep size (15 tokens).
    assert reply.outcome == sessions_pb2.COMPACTION_OUTCOME_FOLDED
    assert reply.session.summarized_turns == 17 and reply.folded_turns == 17
    assert router.calls[0] == [f"t{i}" for i in range(1, 7)]
    await compactor.wait_idle()
    # No appends since: every turn is in the summary or in the window, once each, in order.
    full = await _context(stub)
    for budget in (100_000, full.summary_tokens + 15):
        ctx = await _context(stub, budget)
        assert ctx.omitted_turns == 0 and not ctx.omitted_unsummarized and not ctx.summary_omitted
        window = [t.message.content for t in ctx.turns]
        assert _covered(ctx.summary) + window == [f"t{i}" for i in range(1, 21)], budget
    again = await stub.CompactSession(sessions_pb2.CompactSessionRequest(caller=caller(), session_id="s1"))
    assert again.outcome == sessions_pb2.COMPACTION_OUTCOME_NOTHING_TO_FOLD and again.folded_turns == 0


async def test_a_pass_that_ends_over_the_threshold_runs_again_without_appends(
    clocked: RunningService, clocked_stub: SessionsServiceAsyncStub, router: RouterDown
) -> None:
    stub = clocked_stub
    await stub.CreateSession(sessions_pb2.CreateSessionRequest(caller=caller(), session_id="s1"))
    router.gate = asyncio.Event()
    for i in range(1, 10):
        await _append(stub, user_turn(f"t{i}"))
    await _until(lambda: len(router.calls) == 1, "the background pass to start")
    await _append(stub, *(user_turn(f"t{i}") for i in range(10, 30)))
    router.gate.set()
    await _compactor(clocked).wait_idle()
    # The first pass folded t1-t6 and ended with 23 turns (115 tokens) over the threshold of 40:
    # the driver ran again by itself and folded down to the keep size.
    ctx = await _context(stub)
    assert len(router.calls) == 2 and ctx.total_tokens - ctx.summary_tokens <= 15
    assert _covered(ctx.summary) + [t.message.content for t in ctx.turns] == [f"t{i}" for i in range(1, 30)]


async def test_get_context_folds_what_does_not_fit_before_answering(
    clocked_stub: SessionsServiceAsyncStub, router: RouterDown
) -> None:
    stub = clocked_stub
    await stub.CreateSession(sessions_pb2.CreateSessionRequest(caller=caller(), session_id="s1"))
    await _append(stub, *(user_turn(f"t{i}") for i in range(1, 8)))  # 35 tokens: under the threshold
    ctx = await _context(stub, 30)
    # 35 tokens do not fit 30: rather than drop t1.., GetContext had them folded first.
    assert router.calls and ctx.omitted_turns == 0 and not ctx.omitted_unsummarized
    assert _covered(ctx.summary) + [t.message.content for t in ctx.turns] == [f"t{i}" for i in range(1, 8)]
    assert ctx.total_tokens <= 30


async def test_router_down_flags_the_omission_and_the_session_converges_when_it_returns(
    clocked: RunningService, clocked_stub: SessionsServiceAsyncStub, router: RouterDown, clock: ManualClock
) -> None:
    stub = clocked_stub
    router.down = True
    await stub.CreateSession(sessions_pb2.CreateSessionRequest(caller=caller(), session_id="s1"))
    for i in range(1, 13):
        await _append(stub, user_turn(f"t{i}"))  # 60 tokens: over the threshold of 40
    await _until(lambda: clock.sleeping == 1, "the failed pass to back off")
    assert router.attempts == 1
    ctx = await _context(stub, 30)
    # Only the newest 6 turns fit and nothing summarises the other 6: said, not silent.
    assert ctx.omitted_unsummarized and ctx.omitted_turns == 6 and ctx.summary == ""
    assert [t.message.content for t in ctx.turns] == [f"t{i}" for i in range(7, 13)]
    assert router.attempts == 1  # GetContext did not hammer the router meanwhile
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub.CompactSession(sessions_pb2.CompactSessionRequest(caller=caller(), session_id="s1"))
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "retries in 20s" in (failed.value.details() or "")
    await _until(lambda: clock.sleeping == 1, "the second failure to back off")
    # The router comes back; nobody appends. The driver's own retry converges the session.
    router.down = False
    clock.advance(20)
    await _compactor(clocked).wait_idle()
    ctx = await _context(stub)
    assert not ctx.omitted_unsummarized and ctx.version == 12
    assert ctx.total_tokens - ctx.summary_tokens <= 40
    assert _covered(ctx.summary) + [t.message.content for t in ctx.turns] == [f"t{i}" for i in range(1, 13)]
    small = await _context(stub, 30)
    assert small.omitted_turns == 0 and not small.omitted_unsummarized


@pytest.mark.parametrize("extra_env", [{"BALLAST_SESSIONS_COMPACT_MAX_SESSIONS": "1"}])
async def test_compaction_drivers_are_capped_and_the_cap_is_named(
    clocked: RunningService, clocked_stub: SessionsServiceAsyncStub, router: RouterDown, clock: ManualClock
) -> None:
    stub = clocked_stub
    router.down = True
    for sid in ("s1", "s2"):
        await stub.CreateSession(sessions_pb2.CreateSessionRequest(caller=caller(), session_id=sid))
    await _append(stub, *(user_turn(f"t{i}") for i in range(1, 13)))  # s1: its driver backs off
    await _until(lambda: clock.sleeping == 1, "s1's failed pass to back off")
    await stub.AppendTurns(
        sessions_pb2.AppendTurnsRequest(
            caller=caller(),
            session_id="s2",
            expected_version=-1,
            turns=[user_turn(f"u{i}") for i in range(12)],
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await stub.CompactSession(sessions_pb2.CompactSessionRequest(caller=caller(), session_id="s2"))
    assert full.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "BALLAST_SESSIONS_COMPACT_MAX_SESSIONS" in (full.value.details() or "")
    ctx = await stub.GetContext(
        sessions_pb2.GetContextRequest(caller=caller(), session_id="s2", token_budget=30)
    )
    assert ctx.omitted_unsummarized and ctx.omitted_turns == 6
    # s1 converges once the router is back, which frees the slot for s2.
    router.down = False
    clock.advance(10)
    await _compactor(clocked).wait_idle()
    reply = await stub.CompactSession(sessions_pb2.CompactSessionRequest(caller=caller(), session_id="s2"))
    assert reply.outcome == sessions_pb2.COMPACTION_OUTCOME_FOLDED


@pytest.mark.parametrize("extra_env", [{"BALLAST_SESSIONS_CONTEXT_COMPACT_WAIT": "0"}])
async def test_without_a_wait_get_context_flags_at_once_and_the_pass_runs_behind_it(
    clocked: RunningService, clocked_stub: SessionsServiceAsyncStub, router: RouterDown
) -> None:
    stub = clocked_stub
    await stub.CreateSession(sessions_pb2.CreateSessionRequest(caller=caller(), session_id="s1"))
    router.gate = asyncio.Event()  # the pass cannot finish before GetContext answers
    await _append(stub, *(user_turn(f"t{i}") for i in range(1, 8)))  # 35 tokens: under the threshold
    first = await _context(stub, 30)
    assert first.omitted_unsummarized and first.omitted_turns == 1
    router.gate.set()
    await _compactor(clocked).wait_idle()
    second = await _context(stub, 30)
    assert router.calls and not second.omitted_unsummarized and second.omitted_turns == 0
    assert _covered(second.summary) + [t.message.content for t in second.turns] == [
        f"t{i}" for i in range(1, 8)
    ]
