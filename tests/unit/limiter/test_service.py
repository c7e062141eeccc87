"""LimiterService through a real in-process gRPC server: decisions, budgets, caps, throttling."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from pathlib import Path

import grpc
import pytest
from ballast.common.v1 import common_pb2
from ballast.limiter.v1 import limiter_pb2
from google.protobuf import duration_pb2

from services.testing import Suite
from tests.conftest import SuiteFactory
from tests.support.status import violated_field

TIERS = """
default_tier: free
reservation_ttl: 10m
throttle:
  stale_after: 30s
  max_delay: 4s
  priorities:
    low:      { delay_below: 0.5, deny_below: 0.2 }
    normal:   { delay_below: 0.3, deny_below: 0.1 }
    high:     { delay_below: 0.1, deny_below: 0.0 }
    critical: { delay_below: 0.0, deny_below: 0.0 }
tiers:
  free:
    priority: low
    requests: { limit: 3, window: 1h }
    user_tokens_per_day: { limit: 1000 }
    tenant_tokens_per_day: { limit: 1500 }
    session_tool_calls: { limit: 2 }
  paid:
    priority: normal
    requests: { limit: 5, window: 1h, shadow: true }
    user_tokens_per_day: { limit: 100 }
    tenant_tokens_per_day: { limit: 100000 }
    session_tool_calls: { limit: 25 }
  enterprise:
    priority: high
    requests: { unlimited: true }
    user_tokens_per_day: { unlimited: true }
    tenant_tokens_per_day: { limit: 1000000 }
    session_tool_calls: { limit: 100 }
"""


@pytest.fixture
def tiers_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiers.yaml"
    path.write_text(TIERS)
    return path


@pytest.fixture(params=["memory", "redis"])
async def suite(request: pytest.FixtureRequest, suite_factory: SuiteFactory, tiers_file: Path) -> Suite:
    store = "memory://" if request.param == "memory" else request.getfixturevalue("redis_url")
    return await suite_factory(
        ["limiter"],
        {
            "BALLAST_LIMITER_STORE": store,
            "BALLAST_LIMITER_TIERS_FILE": str(tiers_file),
            "BALLAST_LIMITER_RELOAD_INTERVAL": "50ms",
            # Behaviour with Redis, not outages: a slow answer on a busy machine must not be
            # decided by the fail mode.
            "BALLAST_LIMITER_STORE_TIMEOUT": "60s",
        },
    )


@pytest.fixture
async def memory_suite(suite_factory: SuiteFactory, tiers_file: Path) -> Suite:
    return await suite_factory(["limiter"], {"BALLAST_LIMITER_TIERS_FILE": str(tiers_file)})


def caller(tier: str = "free", user: str = "u1", tenant: str = "t1") -> common_pb2.Caller:
    return common_pb2.Caller(tenant_id=tenant, user_id=user, tier=tier)


def quotas(resp: limiter_pb2.CheckResponse) -> dict[str, limiter_pb2.LimitStatus]:
    return {s.quota.name: s for s in resp.limits}


async def test_free_tier_admits_its_hourly_limit_then_denies_with_retry_after(suite: Suite) -> None:
    decisions = []
    for _ in range(4):
        resp = await suite.limiter.Check(limiter_pb2.CheckRequest(caller=caller(), requests=1))
        decisions.append(resp.decision)
    assert decisions == [limiter_pb2.DECISION_ALLOW] * 3 + [limiter_pb2.DECISION_DENY]
    assert resp.reason == "requests"
    assert 3000 < resp.retry_after.seconds <= 3600 + 180
    q = quotas(resp)["requests"].quota
    assert (q.limit, q.remaining) == (3, 0) and q.reset_after.seconds > 0
    assert resp.priority == common_pb2.PRIORITY_LOW
    # another user of the same tenant has their own quota
    other = await suite.limiter.Check(limiter_pb2.CheckRequest(caller=caller(user="u2"), requests=1))
    assert other.decision == limiter_pb2.DECISION_ALLOW


async def test_edge_chat_flow_reserves_then_commits(suite: Suite) -> None:
    check = await suite.limiter.Check(
        limiter_pb2.CheckRequest(
            caller=caller(),
            session_id="s1",
            requests=1,
            reserve_tokens=600,
            provider="openai",
            request_id="req-1",
        )
    )
    assert check.decision == limiter_pb2.DECISION_ALLOW and check.reservation_id
    q = quotas(check)
    assert q["user_tokens_per_day"].quota.remaining == 400
    assert q["tenant_tokens_per_day"].quota.remaining == 900
    assert q["requests"].quota.remaining == 2
    # while 600 are reserved, a second estimate of 600 does not fit the user's budget
    second = await suite.limiter.Check(
        limiter_pb2.CheckRequest(caller=caller(), requests=1, reserve_tokens=600)
    )
    assert second.decision == limiter_pb2.DECISION_DENY and second.reason == "user_tokens_per_day"
    assert not second.reservation_id
    commit = await suite.limiter.Commit(
        limiter_pb2.CommitRequest(
            reservation_id=check.reservation_id, caller=caller(), actual_tokens=250, cost_micros=1200
        )
    )
    assert commit.reservation_found and not commit.already_settled
    budgets = {b.name: b for b in commit.budgets}
    assert budgets["user_tokens_per_day"].remaining == 750
    again = await suite.limiter.Commit(
        limiter_pb2.CommitRequest(reservation_id=check.reservation_id, caller=caller(), actual_tokens=250)
    )
    assert (
        again.already_settled and {b.name: b for b in again.budgets}["user_tokens_per_day"].remaining == 750
    )
    usage = await suite.limiter.GetUsage(limiter_pb2.GetUsageRequest(caller=caller(), session_id="s1"))
    assert usage.tokens_today == 250 and usage.cost_micros_today == 1200
    by_name = {q.name: q for q in usage.quotas}
    assert by_name["requests"].remaining == 2  # the denied second check counted nothing
    assert by_name["session_tool_calls"].remaining == 2


async def test_a_retried_check_is_not_counted_twice(suite: Suite) -> None:
    request = limiter_pb2.CheckRequest(caller=caller(), requests=1, reserve_tokens=100, request_id="same")
    first = await suite.limiter.Check(request)
    second = await suite.limiter.Check(request)
    assert second.replayed and not first.replayed
    assert second.reservation_id == first.reservation_id
    usage = await suite.limiter.GetUsage(limiter_pb2.GetUsageRequest(caller=caller()))
    by_name = {q.name: q for q in usage.quotas}
    assert by_name["requests"].remaining == 2 and by_name["user_tokens_per_day"].remaining == 900


async def test_tool_calls_are_capped_per_session(suite: Suite) -> None:
    def tool_call(session: str) -> limiter_pb2.CheckRequest:
        return limiter_pb2.CheckRequest(caller=caller(), session_id=session, requests=0, tool_calls=1)

    results = [await suite.limiter.Check(tool_call("s1")) for _ in range(3)]
    assert [r.decision for r in results] == [limiter_pb2.DECISION_ALLOW] * 2 + [limiter_pb2.DECISION_DENY]
    assert results[2].reason == "session_tool_calls"
    assert [s.quota.name for s in results[2].limits] == ["session_tool_calls"]
    assert (await suite.limiter.Check(tool_call("s2"))).decision == limiter_pb2.DECISION_ALLOW
    # tool calls do not spend the hourly interactions
    usage = await suite.limiter.GetUsage(limiter_pb2.GetUsageRequest(caller=caller()))
    assert {q.name: q for q in usage.quotas}["requests"].remaining == 3


async def test_shadow_limits_are_reported_but_not_enforced(suite: Suite) -> None:
    for _ in range(6):
        resp = await suite.limiter.Check(limiter_pb2.CheckRequest(caller=caller("paid"), requests=1))
    assert resp.decision == limiter_pb2.DECISION_ALLOW
    status = quotas(resp)["requests"]
    assert status.shadow and status.over_limit and status.quota.remaining == 0


async def test_enterprise_is_unlimited_with_high_priority(suite: Suite) -> None:
    resp = await suite.limiter.Check(
        limiter_pb2.CheckRequest(caller=caller("enterprise"), requests=1, reserve_tokens=500_000)
    )
    assert resp.decision == limiter_pb2.DECISION_ALLOW
    assert resp.priority == common_pb2.PRIORITY_HIGH
    q = quotas(resp)
    assert q["requests"].quota.unlimited and q["user_tokens_per_day"].quota.unlimited
    assert not q["tenant_tokens_per_day"].quota.unlimited


def seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


async def test_shrinking_headroom_delays_low_priority_before_denying_and_high_goes_first(
    suite: Suite,
) -> None:
    async def report(remaining: int, *, rate_limited: bool = False) -> None:
        await suite.limiter.ReportHeadroom(
            limiter_pb2.ReportHeadroomRequest(
                provider="openai",
                model="gpt",
                remaining_requests=remaining,
                limit_requests=100,
                remaining_tokens=-1,
                limit_tokens=-1,
                reset_requests=seconds(20),
                rate_limited=rate_limited,
                retry_after=seconds(7) if rate_limited else None,
            )
        )

    async def decide(tier: str, provider: str = "openai") -> limiter_pb2.CheckResponse:
        return await suite.limiter.Check(
            limiter_pb2.CheckRequest(caller=caller(tier, user=tier + provider), requests=1, provider=provider)
        )

    await report(80)
    assert (await decide("free")).decision == limiter_pb2.DECISION_ALLOW
    await report(40)  # below low's delay threshold (0.5), above normal's (0.3)
    low = await decide("free")
    assert low.decision == limiter_pb2.DECISION_DELAY and low.reason == "provider_headroom"
    assert 0 < low.delay.ToNanoseconds() <= 4e9
    assert (await decide("paid")).decision == limiter_pb2.DECISION_ALLOW
    await report(15)  # low is denied, normal delayed, high still goes
    denied = await decide("free")
    assert denied.decision == limiter_pb2.DECISION_DENY and denied.reason == "provider_headroom"
    assert 0 < denied.retry_after.ToNanoseconds() <= 20e9
    assert (await decide("paid")).decision == limiter_pb2.DECISION_DELAY
    assert (await decide("enterprise")).decision == limiter_pb2.DECISION_ALLOW
    await report(0, rate_limited=True)  # a 429: high waits, nobody else goes
    assert (await decide("enterprise")).decision == limiter_pb2.DECISION_DELAY
    assert (await decide("paid")).retry_after.ToNanoseconds() <= 7e9
    # a provider nobody reported on is not throttled; an explicit priority overrides the tier's
    assert (await decide("free", provider="anthropic")).decision == limiter_pb2.DECISION_ALLOW
    critical = await suite.limiter.Check(
        limiter_pb2.CheckRequest(
            caller=caller("free", user="c"),
            requests=1,
            provider="openai",
            priority=common_pb2.PRIORITY_CRITICAL,
        )
    )
    assert critical.decision == limiter_pb2.DECISION_ALLOW


async def test_a_throttled_denial_counts_nothing_but_reports_quotas(suite: Suite) -> None:
    await suite.limiter.ReportHeadroom(
        limiter_pb2.ReportHeadroomRequest(provider="p", rate_limited=True, retry_after=seconds(5))
    )
    resp = await suite.limiter.Check(limiter_pb2.CheckRequest(caller=caller(), requests=1, provider="p"))
    assert resp.decision == limiter_pb2.DECISION_DENY and quotas(resp)["requests"].quota.remaining == 3
    usage = await suite.limiter.GetUsage(limiter_pb2.GetUsageRequest(caller=caller()))
    assert {q.name: q for q in usage.quotas}["requests"].remaining == 3


def rewrite(path: Path, text: str, generation: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(1, generation * 10**18))  # a clearly new mtime even on coarse filesystems


async def test_tiers_file_reloads_without_restart(suite: Suite, tiers_file: Path) -> None:
    for _ in range(3):
        await suite.limiter.Check(limiter_pb2.CheckRequest(caller=caller(), requests=1))
    rewrite(
        tiers_file,
        TIERS.replace("requests: { limit: 3, window: 1h }", "requests: { limit: 10, window: 1h }"),
        1,
    )
    for _ in range(100):
        resp = await suite.limiter.Check(limiter_pb2.CheckRequest(caller=caller(), requests=1))
        if resp.decision == limiter_pb2.DECISION_ALLOW:
            break
        await asyncio.sleep(0.05)
    assert resp.decision == limiter_pb2.DECISION_ALLOW and quotas(resp)["requests"].quota.limit == 10
    # a broken file is refused and the last good one stays in force
    rewrite(tiers_file, "tiers: {free: {requests: {limit: -1}}}", 2)
    await asyncio.sleep(0.3)
    resp = await suite.limiter.Check(limiter_pb2.CheckRequest(caller=caller(), requests=1))
    assert quotas(resp)["requests"].quota.limit == 10


async def test_bad_checks_are_invalid_argument_naming_the_field(memory_suite: Suite) -> None:
    cases: list[tuple[limiter_pb2.CheckRequest, str]] = [
        (limiter_pb2.CheckRequest(caller=caller("gold"), requests=1), "caller.tier"),
        (
            limiter_pb2.CheckRequest(caller=common_pb2.Caller(user_id="u", tier="free"), requests=1),
            "caller.tenant_id",
        ),
        (
            limiter_pb2.CheckRequest(caller=common_pb2.Caller(tenant_id="t", tier="free"), requests=1),
            "caller.user_id",
        ),
        (limiter_pb2.CheckRequest(caller=caller(), requests=-1), "requests"),
        (limiter_pb2.CheckRequest(caller=caller(), requests=1, reserve_tokens=-5), "reserve_tokens"),
        (limiter_pb2.CheckRequest(caller=caller(), requests=1, reserve_tokens=10**15), "reserve_tokens"),
        (limiter_pb2.CheckRequest(caller=caller(), requests=10**9), "requests"),
        (limiter_pb2.CheckRequest(caller=caller()), "requests"),
        (limiter_pb2.CheckRequest(caller=caller(), tool_calls=1), "session_id"),
        (limiter_pb2.CheckRequest(caller=caller(), requests=1, request_id="x" * 1000), "request_id"),
        (limiter_pb2.CheckRequest(caller=caller(), requests=1, priority=99), "priority"),  # type: ignore[arg-type]
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await memory_suite.limiter.Check(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert violated_field(info.value) == field


async def test_bad_commits_headroom_and_usage_are_invalid_argument(memory_suite: Suite) -> None:
    suite = memory_suite
    cases: list[tuple[Awaitable[object], str]] = [
        (suite.limiter.Commit(limiter_pb2.CommitRequest(caller=caller(), actual_tokens=-1)), "actual_tokens"),
        (suite.limiter.Commit(limiter_pb2.CommitRequest(caller=caller(), cost_micros=-1)), "cost_micros"),
        (suite.limiter.Commit(limiter_pb2.CommitRequest(caller=caller("nope"))), "caller.tier"),
        (suite.limiter.ReportHeadroom(limiter_pb2.ReportHeadroomRequest()), "provider"),
        (
            suite.limiter.ReportHeadroom(
                limiter_pb2.ReportHeadroomRequest(provider="p", remaining_tokens=-7)
            ),
            "remaining_tokens",
        ),
        (suite.limiter.GetUsage(limiter_pb2.GetUsageRequest()), "caller.tenant_id"),
    ]
    for call, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert violated_field(info.value) == field


async def test_a_commit_without_reservation_charges_the_actual_tokens(suite: Suite) -> None:
    resp = await suite.limiter.Commit(limiter_pb2.CommitRequest(caller=caller(), actual_tokens=300))
    assert not resp.reservation_found
    assert {b.name: b for b in resp.budgets}["user_tokens_per_day"].remaining == 700


async def test_headroom_reported_to_one_replica_throttles_the_others(
    suite_factory: SuiteFactory, tiers_file: Path, redis_url: str
) -> None:
    environ = {
        "BALLAST_LIMITER_STORE": redis_url,
        "BALLAST_LIMITER_TIERS_FILE": str(tiers_file),
        "BALLAST_LIMITER_HEADROOM_REFRESH": "50ms",
        # The cause of this test's old flakiness: with the default 250 ms, a busy machine made
        # the store call time out, the replica decided by its fail mode and the report never
        # reached Redis. What is tested here is sharing, not outages: no timeout may decide it.
        "BALLAST_LIMITER_STORE_TIMEOUT": "60s",
    }
    first, second = await suite_factory(["limiter"], environ), await suite_factory(["limiter"], environ)
    request = limiter_pb2.CheckRequest(caller=caller(), requests=1, provider="openai")
    assert (await second.limiter.Check(request)).decision == limiter_pb2.DECISION_ALLOW
    await first.limiter.ReportHeadroom(
        limiter_pb2.ReportHeadroomRequest(provider="openai", rate_limited=True, retry_after=seconds(30))
    )
    # The second replica learns of the report at its next refresh: poll with a generous deadline
    # (inside the report's 30 s: the tiers cap it at stale_after), a new user each time so that
    # only the headroom can refuse.
    deadline = asyncio.get_running_loop().time() + 25
    attempt = 0
    while True:
        attempt += 1
        response = await second.limiter.Check(
            limiter_pb2.CheckRequest(caller=caller(user=f"r{attempt}"), requests=1, provider="openai")
        )
        if response.decision != limiter_pb2.DECISION_ALLOW or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert not response.degraded
    assert response.decision == limiter_pb2.DECISION_DENY and response.reason == "provider_headroom"
