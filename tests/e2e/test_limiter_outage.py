"""The limiter's fail modes: Redis killed or hung mid-run, decisions keep coming, recovery without restart."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis
from ballast.common.v1 import common_pb2
from ballast.limiter.v1 import limiter_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from services.testing import Suite
from tests.conftest import SuiteFactory
from tests.support.backends import PrivateRedis, private_redis
from tests.support.waiting import eventually

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


async def start(
    suite_factory: SuiteFactory, tmp_path: Path, url: str, mode: str, *, store_timeout: str = "10s"
) -> Suite:
    """A limiter on `url`. A killed Redis refuses connections at once, so only the hung-Redis test
    needs a short store timeout; elsewhere a slow answer from a live Redis on a busy machine must
    not count as an outage (the decisions asserted would turn degraded)."""
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text(TIERS)
    return await suite_factory(
        ["limiter"],
        {
            "BALLAST_LIMITER_STORE": url,
            "BALLAST_LIMITER_TIERS_FILE": str(tiers),
            "BALLAST_LIMITER_FAIL_MODE": mode,
            "BALLAST_LIMITER_STORE_TIMEOUT": store_timeout,
            "BALLAST_LIMITER_STORE_RETRY_INTERVAL": "200ms",
            "BALLAST_LIMITER_REPLICAS": "2",
        },
    )


def check(user: str, tokens: int = 0) -> limiter_pb2.CheckRequest:
    return limiter_pb2.CheckRequest(
        caller=common_pb2.Caller(tenant_id="t", user_id=user, tier="free"), requests=1, reserve_tokens=tokens
    )


async def timed(suite: Suite, request: limiter_pb2.CheckRequest) -> tuple[limiter_pb2.CheckResponse, float]:
    """The answer and how long it took. A call waiting on the dead or hung Redis itself would
    never answer: the generous deadline fails it, so no assertion needs to bet on a duration."""
    started = time.perf_counter()
    response = await suite.limiter.Check(request, timeout=30)
    return response, time.perf_counter() - started


async def wait_recovered(suite: Suite, user: str) -> limiter_pb2.CheckResponse:
    async def decided_by_redis() -> limiter_pb2.CheckResponse | None:
        response = await suite.limiter.Check(check(user), timeout=30)
        return None if response.degraded else response

    response: limiter_pb2.CheckResponse | None = await eventually(
        decided_by_redis, what="a decision by Redis again", interval=0.05
    )
    assert response is not None
    return response


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
        response, _ = await timed(suite, check("during"))
        assert response.degraded
        decisions.append(response.decision)
    # 10 per hour shared by 2 replicas: each replica alone admits 5
    assert decisions == [limiter_pb2.DECISION_ALLOW] * 5 + [limiter_pb2.DECISION_DENY] * 3

    await asyncio.to_thread(redis_server.start)
    await wait_recovered(suite, "after")
    # The five admitted on this replica alone were written back to Redis: the sixth is counted
    # after them (10 - 6 left).
    recovered = await suite.limiter.Check(check("during"))
    assert recovered.decision == limiter_pb2.DECISION_ALLOW and not recovered.degraded
    limits = {s.quota.name: s.quota for s in recovered.limits}
    assert limits["requests"].limit == 10 and limits["requests"].remaining == 4


async def test_a_hung_redis_costs_one_timeout_then_decisions_flow(
    suite_factory: SuiteFactory, tmp_path: Path, redis_server: PrivateRedis
) -> None:
    # Short, so the test does not wait long; a busy machine that outlasts it only makes a decision
    # degraded early, which the wait below and the assertions during the pause allow for.
    suite = await start(suite_factory, tmp_path, redis_server.url, "local", store_timeout="500ms")
    await wait_recovered(suite, "u")
    assert redis_server._proc is not None
    pid = redis_server._proc.pid
    os.kill(pid, signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        # Redis stays paused while these are answered: they are bounded by the store timeout, not
        # by Redis (a call waiting on Redis would run into the 30 s deadline and fail the test).
        responses = await asyncio.gather(
            *(suite.limiter.Check(check(f"h{i}"), timeout=30) for i in range(20))
        )
        assert all(r.degraded and r.decision == limiter_pb2.DECISION_ALLOW for r in responses)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert (await wait_recovered(suite, "u")).decision == limiter_pb2.DECISION_ALLOW


async def test_fail_closed_denies_and_commit_is_unavailable(
    suite_factory: SuiteFactory, tmp_path: Path, redis_server: PrivateRedis
) -> None:
    suite = await start(suite_factory, tmp_path, redis_server.url, "closed")
    await asyncio.to_thread(redis_server.stop, kill=True)
    response, _ = await timed(suite, check("c", tokens=10))
    assert response.decision == limiter_pb2.DECISION_DENY and response.reason == "store_unavailable"
    assert response.degraded and response.retry_after.ToNanoseconds() > 0
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


FLEET_TIERS = """
tiers:
  free:
    requests: { limit: 120, window: 1h }
    user_tokens_per_day: { limit: 3000 }
    tenant_tokens_per_day: { limit: 100000000 }
    session_tool_calls: { limit: 20 }
"""
FLEET_ENVOY = """
domain: fleet
descriptors:
  - key: client
    rate_limit: { unit: hour, requests_per_unit: 120 }
"""
REPLICAS = 4


class Fleet:
    """Four replicas on one Redis under steady load, with what each admitted and saw."""

    def __init__(self, suites: list[Suite]) -> None:
        self.suites = suites
        self.requests = 0  # interactions admitted
        self.tokens = 0  # tokens committed
        self.tool_calls = 0  # tool calls admitted
        self.envoy_ok = 0  # Envoy descriptors answered OK
        self.envoy_hits = 0  # Envoy hits sent
        self.degraded = [0] * len(suites)
        self.healthy = [0] * len(suites)
        # Per replica: its last tool-call answer was a denial (it knows the cap is reached).
        self.capped = [False] * len(suites)
        self.stop = asyncio.Event()

    async def work(self, i: int) -> None:
        suite = self.suites[i]
        who = common_pb2.Caller(tenant_id="t", user_id="w", tier="free")
        envoy = rls_pb2_grpc.RateLimitServiceStub(suite.channel("limiter"))
        n = 0
        while not self.stop.is_set():
            n += 1
            responses = [
                await suite.limiter.Check(
                    limiter_pb2.CheckRequest(caller=who, requests=1, request_id=f"r{i}-{n}"), timeout=30
                ),
                await suite.limiter.Check(
                    limiter_pb2.CheckRequest(caller=who, tool_calls=1, session_id="s"), timeout=30
                ),
            ]
            budget = await suite.limiter.Check(
                limiter_pb2.CheckRequest(
                    caller=common_pb2.Caller(tenant_id="t", user_id="b", tier="free"), reserve_tokens=100
                ),
                timeout=30,
            )
            if budget.decision != limiter_pb2.DECISION_DENY:
                await suite.limiter.Commit(
                    limiter_pb2.CommitRequest(
                        caller=common_pb2.Caller(tenant_id="t", user_id="b", tier="free"),
                        reservation_id=budget.reservation_id,
                        actual_tokens=100,
                    ),
                    timeout=30,
                )
                self.tokens += 100
            answer = await envoy.ShouldRateLimit(
                rls_pb2.RateLimitRequest(
                    domain="fleet",
                    descriptors=[
                        ratelimit_pb2.RateLimitDescriptor(
                            entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="client", value="c")]
                        )
                    ],
                ),
                timeout=30,
            )
            self.envoy_hits += 1
            self.envoy_ok += answer.overall_code == rls_pb2.RateLimitResponse.OK
            self.requests += responses[0].decision != limiter_pb2.DECISION_DENY
            self.tool_calls += responses[1].decision != limiter_pb2.DECISION_DENY
            self.capped[i] = responses[1].decision == limiter_pb2.DECISION_DENY
            if any(r.degraded for r in (*responses, budget)):
                self.degraded[i] += 1
            else:
                self.healthy[i] += 1

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        """Polls with a generous deadline: the load decides how fast things happen, not a timer."""
        deadline = asyncio.get_running_loop().time() + 120
        while not condition():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.02)

    async def through_outage(self, what: str) -> None:
        """Waits until every replica decided on its own often enough to spend its share."""
        seen = list(self.degraded)
        await self.until(lambda: all(d >= s + 40 for d, s in zip(self.degraded, seen, strict=True)), what)

    async def recovered(self) -> None:
        seen = list(self.healthy)
        await self.until(
            lambda: all(h >= s + 2 for h, s in zip(self.healthy, seen, strict=True)),
            "recovery on every replica",
        )


async def test_four_replicas_stay_within_their_share_through_a_pause_and_a_kill_then_catch_up(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text(FLEET_TIERS)
    envoy_config = tmp_path / "fleet.yaml"
    envoy_config.write_text(FLEET_ENVOY)
    with private_redis(durable=True) as server:
        environ = {
            "BALLAST_LIMITER_STORE": server.url,
            "BALLAST_LIMITER_TIERS_FILE": str(tiers),
            "BALLAST_LIMITER_ENVOY_CONFIG": str(envoy_config),
            "BALLAST_LIMITER_FAIL_MODE": "local",
            "BALLAST_LIMITER_REPLICAS": str(REPLICAS),
            # How long a paused Redis holds a decision: a fired timeout only moves decisions to
            # the local share earlier, which the bounds below allow for, so no outcome depends on it.
            "BALLAST_LIMITER_STORE_TIMEOUT": "300ms",
            "BALLAST_LIMITER_STORE_RETRY_INTERVAL": "100ms",
        }
        fleet = Fleet([await suite_factory(["limiter"], environ) for _ in range(REPLICAS)])
        workers = [asyncio.create_task(fleet.work(i)) for i in range(REPLICAS)]
        try:
            # The tool-call cap and the token budget are spent before the outage, and every
            # replica has seen the cap refuse; the interaction and Envoy limits are not.
            await fleet.until(
                lambda: all(fleet.capped) and fleet.tokens >= 3000 and fleet.requests >= 60,
                "the cap and budget spent",
            )
            assert fleet.requests < 120 and fleet.envoy_ok < 120
            assert server._proc is not None
            pid = server._proc.pid
            os.kill(pid, signal.SIGSTOP)  # accepts connections, answers nothing
            try:
                await fleet.through_outage("decisions during the pause")
            finally:
                os.kill(pid, signal.SIGCONT)
            await fleet.recovered()
            await asyncio.to_thread(server.stop, kill=True)
            await fleet.through_outage("decisions while Redis is dead")
            await asyncio.to_thread(server.start)
            await fleet.recovered()
        finally:
            fleet.stop.set()
            await asyncio.gather(*workers)

        share = 120 // REPLICAS
        # Over-admission is at most each replica's share (in practice about nothing: each
        # replica also keeps to its share of what Redis last said was left).
        assert fleet.requests - 120 <= REPLICAS * share
        assert fleet.envoy_ok - 120 <= REPLICAS * share
        # The load did spend the limits: every replica was asked for more than its share.
        assert fleet.envoy_hits > 120 + 2 * REPLICAS * share
        # Spent before the outage and seen spent by every replica: nothing more, even cut off.
        assert fleet.tool_calls == 20
        assert fleet.tokens == 3000

        # What the replicas counted on their own is in Redis now (a decision Redis ran after it
        # was given up on counts twice, so at least).
        client = redis.Redis(port=server.port)
        try:
            window = client.hgetall("{t:t}:u:w:rq:3600000:20")
            assert sum(int(v) for v in window.values()) >= fleet.requests
            assert int(client.get("{t:t}:s:s:tc") or 0) >= fleet.tool_calls
            assert int(client.hget("{t:t}:u:b:tok", "used") or 0) >= fleet.tokens
            assert int(client.hget("{rls:fleet}:client_c:3600000", "n") or 0) >= fleet.envoy_hits
        finally:
            client.close()


async def test_fail_closed_refuses_envoy_checks_too(
    suite_factory: SuiteFactory, tmp_path: Path, redis_server: PrivateRedis
) -> None:
    config = tmp_path / "closed.yaml"
    config.write_text(
        """
domain: closed
descriptors:
  - key: k
    rate_limit: { unit: minute, requests_per_unit: 100 }
  - key: zero
    rate_limit: { unit: minute, requests_per_unit: 0 }
  - key: watch
    shadow_mode: true
    rate_limit: { unit: minute, requests_per_unit: 1 }
"""
    )
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text(TIERS)
    suite = await suite_factory(
        ["limiter"],
        {
            "BALLAST_LIMITER_STORE": redis_server.url,
            "BALLAST_LIMITER_TIERS_FILE": str(tiers),
            "BALLAST_LIMITER_ENVOY_CONFIG": str(config),
            "BALLAST_LIMITER_FAIL_MODE": "closed",
            "BALLAST_LIMITER_STORE_RETRY_INTERVAL": "200ms",
            # Not the 250 ms default: a slow answer on a busy machine would be refused as an outage.
            "BALLAST_LIMITER_STORE_TIMEOUT": "10s",
        },
    )
    stub = rls_pb2_grpc.RateLimitServiceStub(suite.channel("limiter"))

    def ask(*keys: str) -> rls_pb2.RateLimitRequest:
        return rls_pb2.RateLimitRequest(
            domain="closed",
            descriptors=[
                ratelimit_pb2.RateLimitDescriptor(
                    entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value="v")]
                )
                for k in keys
            ],
        )

    assert (await stub.ShouldRateLimit(ask("k"))).overall_code == rls_pb2.RateLimitResponse.OK
    await asyncio.to_thread(redis_server.stop, kill=True)
    for keys in (("k",), ("zero",), ("k", "unconfigured", "watch")):
        response = await stub.ShouldRateLimit(ask(*keys), timeout=30)
        assert response.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT, keys
        codes = [s.code for s in response.statuses]
        expected = {"k": "OVER_LIMIT", "zero": "OVER_LIMIT", "unconfigured": "OK", "watch": "OK"}
        assert [rls_pb2.RateLimitResponse.Code.Name(c) for c in codes] == [expected[k] for k in keys]
        assert all(s.limit_remaining == 0 for s in response.statuses)
