"""The limiter's fail modes: Redis killed or hung mid-run, decisions keep coming, recovery without restart."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from ballast.common.v1 import common_pb2
from ballast.limiter.v1 import limiter_pb2

from services.testing import Suite
from tests.conftest import SuiteFactory
from tests.support.backends import PrivateRedis, private_redis

TIERS = """
tiers:
  free:
    requests: { limit: 10, window: 1h }
    user_tokens_per_day: { limit: 1000 }
    tenant_tokens_per_day: { limit: 100000 }
"""


@pytest.fixture
def redis_server() -> Iterator[PrivateRedis]:
    with private_redis() as server:
        yield server


async def start(suite_factory: SuiteFactory, tmp_path: Path, url: str, mode: str) -> Suite:
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text(TIERS)
    return await suite_factory(
        ["limiter"],
        {
            "BALLAST_LIMITER_STORE": url,
            "BALLAST_LIMITER_TIERS_FILE": str(tiers),
            "BALLAST_LIMITER_FAIL_MODE": mode,
            "BALLAST_LIMITER_STORE_TIMEOUT": "150ms",
            "BALLAST_LIMITER_STORE_RETRY_INTERVAL": "200ms",
            "BALLAST_LIMITER_REPLICAS": "2",
        },
    )


def check(user: str, tokens: int = 0) -> limiter_pb2.CheckRequest:
    return limiter_pb2.CheckRequest(
        caller=common_pb2.Caller(tenant_id="t", user_id=user, tier="free"), requests=1, reserve_tokens=tokens
    )


async def timed(suite: Suite, request: limiter_pb2.CheckRequest) -> tuple[limiter_pb2.CheckResponse, float]:
    started = time.perf_counter()
    response = await suite.limiter.Check(request, timeout=5)
    return response, time.perf_counter() - started


async def wait_recovered(suite: Suite, user: str) -> limiter_pb2.CheckResponse:
    for _ in range(100):
        response = await suite.limiter.Check(check(user))
        if not response.degraded:
            return response
        await asyncio.sleep(0.05)
    raise AssertionError("the limiter did not return to Redis")


async def test_fail_local_keeps_deciding_with_per_replica_limits_and_recovers(
    suite_factory: SuiteFactory, tmp_path: Path, redis_server: PrivateRedis
) -> None:
    suite = await start(suite_factory, tmp_path, redis_server.url, "local")
    for _ in range(3):
        response, _ = await timed(suite, check("before"))
        assert response.decision == limiter_pb2.DECISION_ALLOW and not response.degraded

    await asyncio.to_thread(redis_server.stop, kill=True)
    decisions = []
    for _ in range(8):
        response, elapsed = await timed(suite, check("during"))
        assert response.degraded and elapsed < 1.0
        decisions.append(response.decision)
    # 10 per hour shared by 2 replicas: each replica alone admits 5
    assert decisions == [limiter_pb2.DECISION_ALLOW] * 5 + [limiter_pb2.DECISION_DENY] * 3

    await asyncio.to_thread(redis_server.start)
    recovered = await wait_recovered(suite, "after")
    assert recovered.decision == limiter_pb2.DECISION_ALLOW
    limits = {s.quota.name: s.quota for s in recovered.limits}
    assert limits["requests"].limit == 10 and limits["requests"].remaining == 9


async def test_a_hung_redis_costs_one_timeout_then_decisions_flow(
    suite_factory: SuiteFactory, tmp_path: Path, redis_server: PrivateRedis
) -> None:
    suite = await start(suite_factory, tmp_path, redis_server.url, "local")
    assert not (await suite.limiter.Check(check("u"))).degraded
    assert redis_server._proc is not None
    pid = redis_server._proc.pid
    os.kill(pid, signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        started = time.perf_counter()
        responses = await asyncio.gather(*(suite.limiter.Check(check(f"h{i}"), timeout=5) for i in range(20)))
        elapsed = time.perf_counter() - started
        assert all(r.degraded and r.decision == limiter_pb2.DECISION_ALLOW for r in responses)
        assert elapsed < 2.0  # bounded by the store timeout, not by the hung Redis
    finally:
        os.kill(pid, signal.SIGCONT)
    assert (await wait_recovered(suite, "u")).decision == limiter_pb2.DECISION_ALLOW


async def test_fail_closed_denies_and_commit_is_unavailable(
    suite_factory: SuiteFactory, tmp_path: Path, redis_server: PrivateRedis
) -> None:
    suite = await start(suite_factory, tmp_path, redis_server.url, "closed")
    await asyncio.to_thread(redis_server.stop, kill=True)
    response, elapsed = await timed(suite, check("c", tokens=10))
    assert response.decision == limiter_pb2.DECISION_DENY and response.reason == "store_unavailable"
    assert response.degraded and response.retry_after.ToNanoseconds() > 0 and elapsed < 1.0
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.limiter.Commit(
            limiter_pb2.CommitRequest(
                caller=common_pb2.Caller(tenant_id="t", user_id="c", tier="free"), actual_tokens=5
            )
        )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    await asyncio.to_thread(redis_server.start)
    assert (await wait_recovered(suite, "c")).decision == limiter_pb2.DECISION_ALLOW


async def test_fail_open_allows_everything_while_redis_is_down(
    suite_factory: SuiteFactory, tmp_path: Path, redis_server: PrivateRedis
) -> None:
    suite = await start(suite_factory, tmp_path, redis_server.url, "open")
    await asyncio.to_thread(redis_server.stop, kill=True)
    responses = [(await timed(suite, check("o", tokens=900)))[0] for _ in range(15)]
    assert all(r.decision == limiter_pb2.DECISION_ALLOW and r.degraded for r in responses)
