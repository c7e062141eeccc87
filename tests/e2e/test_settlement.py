"""Settlement after the model answered, against a limiter in a process of its own that stops
answering between a chat's Check and its Commit: the chat still answers, the Commit is recorded,
and once the limiter is back the tokens are charged exactly once, even after an edge restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2
from ballast.limiter.v1 import limiter_pb2, limiter_pb2_grpc

from services.edge.app import EdgeApp
from services.router.app import RouterApp
from services.testing import Suite
from tests.conftest import SuiteFactory
from tests.e2e.conftest import new_tenant, write_test_config
from tests.support.backends import free_port
from tests.support.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]
# Slow enough that the limiter is certainly stopped before the model answers.
MODEL_MS = 4000
SETTLEMENT = {
    # A response waits this long for its Commit; then it is recorded and retried in the background.
    "BALLAST_EDGE_SETTLE_WAIT": "300ms",
    "BALLAST_EDGE_SETTLE_INTERVAL": "100ms",
    "BALLAST_EDGE_SETTLE_RETRY_MAX": "500ms",
}


@contextlib.asynccontextmanager
async def limiter_process(environ: dict[str, str], port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    env = {
        **os.environ,
        **environ,
        "BALLAST_HOST": "127.0.0.1",
        "BALLAST_LIMITER_PORT": str(port),
        "BALLAST_LIMITER_METRICS_PORT": "0",
        "OTEL_SDK_DISABLED": "true",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.limiter", cwd=ROOT, env=env
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 60)
        yield process
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)
            process.kill()
            await process.wait()


async def charged(port: int, caller: common_pb2.Caller) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        usage = await limiter_pb2_grpc.LimiterServiceStub(channel).GetUsage(
            limiter_pb2.GetUsageRequest(caller=caller), timeout=10
        )
    return usage.tokens_today


async def chat_while_the_limiter_stops(
    edge: Suite, backends: Suite, limiter: asyncio.subprocess.Process, how: signal.Signals
) -> tuple[edge_pb2.ChatResponse, common_pb2.Caller]:
    """A paid chat whose Check reaches the limiter and whose Commit finds it stopped by `how`."""
    tenant = await new_tenant(edge)
    router = backends.running["router"].app
    assert isinstance(router, RouterApp)
    primary = router.sims["sim-primary"]
    before = primary.stats.requests
    chat = asyncio.ensure_future(
        edge.edge.Chat(
            edge_pb2.ChatRequest(
                messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="settle this, please")],
                cache_mode=edge_pb2.CACHE_MODE_BYPASS,
            ),
            metadata=tenant.auth("paid"),
            timeout=60,
        )
    )
    # The model is called after the Check: from here on the limiter may go.
    await eventually(lambda: primary.stats.requests > before or chat.done(), what="the model called")
    assert not chat.done(), "the chat ended before its model call"
    os.kill(limiter.pid, how)
    response = await chat
    assert response.usage.total_tokens > 0
    return response, common_pb2.Caller(tenant_id=tenant.tenant_id, user_id="paid-user", tier="paid")


def _edge_app(suite: Suite) -> EdgeApp:
    app = suite.running["edge"].app
    assert isinstance(app, EdgeApp)
    return app


async def test_a_commit_the_stalled_limiter_missed_is_applied_once_when_it_resumes(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    environ = write_test_config(tmp_path, sim_latency_ms=MODEL_MS)
    port = free_port()
    async with limiter_process(environ, port) as limiter:
        backends = await suite_factory(["router", "cache", "sessions"], environ)
        addresses = {f"BALLAST_{n.upper()}_ADDR": backends.address(n) for n in backends.running}
        edge = await suite_factory(
            ["edge"], {**environ, **addresses, **SETTLEMENT, "BALLAST_LIMITER_ADDR": f"127.0.0.1:{port}"}
        )
        app = _edge_app(edge)
        # Paused, not dead: the Commits sent meanwhile wait in its socket and may still be
        # applied when it resumes, after the edge gave up on their replies.
        response, caller = await chat_while_the_limiter_stops(edge, backends, limiter, signal.SIGSTOP)
        # The answer did not wait for the limiter beyond the settle wait: the Commit is recorded.
        await eventually(lambda: app.store.settlement_count(), what="the settlement recorded")
        assert await app.store.settlement_count() == 1
        recorded = await app.store.pending_settlements(10)
        os.kill(limiter.pid, signal.SIGCONT)

        async def settled() -> bool:
            return app.settler.in_flight == 0 and await app.store.settlement_count() == 0

        await eventually(settled, what="the recorded settlement applied")
        assert await charged(port, caller) == response.usage.total_tokens
        # The same settlement again (as when a Commit landed but its reply was lost): the limiter
        # knows the reservation is settled and charges nothing twice.
        for key, record in recorded:
            await app.store.put_settlement(key, record)
        await eventually(settled, what="the repeated settlement applied")
        assert await charged(port, caller) == response.usage.total_tokens


@pytest.mark.parametrize("retrying", [False, True], ids=["recorded", "still-retrying-at-shutdown"])
async def test_a_settlement_recorded_in_redis_survives_an_edge_restart(
    suite_factory: SuiteFactory, tmp_path: Path, redis_url: str, retrying: bool
) -> None:
    environ = {**write_test_config(tmp_path, sim_latency_ms=MODEL_MS), "BALLAST_LIMITER_STORE": redis_url}
    port = free_port()
    backends = await suite_factory(["router", "cache", "sessions"], environ)
    edge_env = {
        **environ,
        **{f"BALLAST_{n.upper()}_ADDR": backends.address(n) for n in backends.running},
        **SETTLEMENT,
        "BALLAST_LIMITER_ADDR": f"127.0.0.1:{port}",
        "BALLAST_EDGE_STORE": redis_url,
    }
    # Still retrying: the edge stops while its settlement is still being retried, and records it
    # as it stops.
    first_env = {**edge_env, "BALLAST_EDGE_SETTLE_WAIT": "10m"} if retrying else edge_env
    async with limiter_process(environ, port) as limiter:
        first = await suite_factory(["edge"], first_env)
        response, caller = await chat_while_the_limiter_stops(first, backends, limiter, signal.SIGKILL)
        await limiter.wait()
        if retrying:
            assert _edge_app(first).settler.in_flight == 1
        else:
            await eventually(
                lambda: _edge_app(first).store.settlement_count(), what="the settlement recorded"
            )
            assert await _edge_app(first).store.settlement_count() == 1
        # The edge goes away before the limiter is back.
        await first.stop(0)
    # The limiter's counters live in Redis: a new process carries on from them.
    async with limiter_process(environ, port):
        second = await suite_factory(["edge"], edge_env)
        app = _edge_app(second)

        async def applied() -> bool:
            return await app.store.settlement_count() == 0

        await eventually(applied, what="the settlement recorded by the first edge applied by the second")
        assert await charged(port, caller) == response.usage.total_tokens


async def test_a_settlement_the_limiter_refuses_for_good_is_dropped_not_retried_forever(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    environ = write_test_config(tmp_path)
    suite = await suite_factory(["router", "limiter", "cache", "sessions", "edge"], {**environ, **SETTLEMENT})
    app = _edge_app(suite)
    gone = limiter_pb2.CommitRequest(
        reservation_id="r-of-a-removed-tier",
        caller=common_pb2.Caller(tenant_id="t", user_id="u", tier="no-such-tier"),
        actual_tokens=42,
    )
    # Inline: the first try is refused (INVALID_ARGUMENT), so nothing is recorded to retry.
    assert await app.settler.settle(gone) is None
    assert app.settler.in_flight == 0 and await app.store.settlement_count() == 0
    # Recorded earlier (say, before its tier was removed): the reconciler drops it.
    await app.store.put_settlement(gone.reservation_id, gone.SerializeToString())

    async def dropped() -> bool:
        return await app.store.settlement_count() == 0

    await eventually(dropped, what="the refused settlement dropped")
