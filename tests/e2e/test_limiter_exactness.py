"""Several limiter replicas (separate processes) on one Redis stay exact under concurrency.

Many concurrent clients hit one key through every replica: the number admitted equals the
limit exactly, and a token budget is never overspent while reservations and commits race.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from ballast.common.v1 import common_pb2
from ballast.limiter.v1 import limiter_pb2, limiter_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.backends import free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")
ROOT = Path(__file__).resolve().parents[2]
REPLICAS = 3
REQUEST_LIMIT = 50
TOKEN_BUDGET = 10_000

TIERS = f"""
tiers:
  free:
    requests: {{ limit: {REQUEST_LIMIT}, window: 1h }}
    user_tokens_per_day: {{ limit: {TOKEN_BUDGET} }}
    tenant_tokens_per_day: {{ limit: 1000000 }}
"""


async def _serving(address: str, deadline: float) -> None:
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"limiter at {address} did not start")
            await asyncio.sleep(0.1)


def _spawn(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.limiter"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL
    )


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


# The tests use different users, so they share the three replica processes (and their start-up).
@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def replicas(
    module_redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[list[limiter_pb2_grpc.LimiterServiceAsyncStub]]:
    redis_url = module_redis_url
    tiers = tmp_path_factory.mktemp("exactness") / "tiers.yaml"
    tiers.write_text(TIERS)
    procs: list[subprocess.Popen[bytes]] = []
    addresses = []
    for _ in range(REPLICAS):
        port = free_port()
        env = {
            **os.environ,
            "BALLAST_LIMITER_PORT": str(port),
            "BALLAST_LIMITER_STORE": redis_url,
            "BALLAST_LIMITER_TIERS_FILE": str(tiers),
            # Exactness is what is measured: a slow call on this loaded machine must not fall
            # back to a local limit, so fail closed with a generous timeout and check `degraded`.
            "BALLAST_LIMITER_FAIL_MODE": "closed",
            "BALLAST_LIMITER_STORE_TIMEOUT": "5s",
            "BALLAST_METRICS": "false",
            "OTEL_SDK_DISABLED": "true",
            "BALLAST_LOG_LEVEL": "warning",
        }
        procs.append(_spawn(env))
        addresses.append(f"127.0.0.1:{port}")
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    try:
        deadline = asyncio.get_running_loop().time() + 30
        await asyncio.gather(*(_serving(a, deadline) for a in addresses))
        yield [limiter_pb2_grpc.LimiterServiceStub(c) for c in channels]
    finally:
        for channel in channels:
            await channel.close()
        await asyncio.to_thread(_stop, procs)


def caller(user: str) -> common_pb2.Caller:
    return common_pb2.Caller(tenant_id="acme", user_id=user, tier="free")


async def test_admitted_equals_the_limit_exactly_across_replicas(
    replicas: list[limiter_pb2_grpc.LimiterServiceAsyncStub],
) -> None:
    attempts = REQUEST_LIMIT * 4
    gate = asyncio.Semaphore(64)

    async def one(i: int) -> limiter_pb2.CheckResponse:
        async with gate:
            stub = replicas[i % len(replicas)]
            return await stub.Check(limiter_pb2.CheckRequest(caller=caller("hot"), requests=1), timeout=30)

    responses = await asyncio.gather(*(one(i) for i in range(attempts)))
    assert not any(r.degraded for r in responses)
    admitted = sum(r.decision == limiter_pb2.DECISION_ALLOW for r in responses)
    assert admitted == REQUEST_LIMIT
    denied = [r for r in responses if r.decision == limiter_pb2.DECISION_DENY]
    assert len(denied) == attempts - REQUEST_LIMIT and all(r.reason == "requests" for r in denied)


async def test_token_budget_is_never_overspent_while_reservations_and_commits_race(
    replicas: list[limiter_pb2_grpc.LimiterServiceAsyncStub],
) -> None:
    rng = random.Random(7)
    estimate = 300
    charged: list[int] = []

    async def worker(w: int) -> None:
        for i in range(40):
            stub = replicas[(w + i) % len(replicas)]
            check = await stub.Check(
                limiter_pb2.CheckRequest(caller=caller("spender"), reserve_tokens=estimate), timeout=30
            )
            assert not check.degraded
            if check.decision != limiter_pb2.DECISION_ALLOW:
                return
            actual = rng.randint(50, estimate)
            other = replicas[(w + i + 1) % len(replicas)]
            await other.Commit(
                limiter_pb2.CommitRequest(
                    reservation_id=check.reservation_id, caller=caller("spender"), actual_tokens=actual
                ),
                timeout=30,
            )
            charged.append(actual)

    await asyncio.gather(*(worker(w) for w in range(24)))
    # Racing workers stop at their first denial (maybe while others still held estimates);
    # one last client then spends what is left, so the budget ends truly used up.
    await worker(0)
    usage = await replicas[0].GetUsage(limiter_pb2.GetUsageRequest(caller=caller("spender")))
    assert usage.tokens_today == sum(charged)
    assert usage.tokens_today <= TOKEN_BUDGET
    # the budget was really used up: less than one estimate is left
    assert TOKEN_BUDGET - usage.tokens_today < estimate
