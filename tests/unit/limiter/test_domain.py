"""The limiter's domain with an injected clock: time-dependent behaviour without sleeping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.limiter.limiter import CheckInput, Limiter, StaticTiers, _q, new_reservation_id
from services.limiter.store.memory import MemoryStore
from services.limiter.throttle import HeadroomBoard, HeadroomReport, judge
from services.limiter.tiers import Throttle, TiersError, load_tiers, parse_tiers

ROOT = Path(__file__).resolve().parents[3]

TIERS = """
reservation_ttl: 30s
session_ttl: 1h
near_limit_ratio: 0.5
tiers:
  free:
    priority: low
    requests: {limit: 4, window: 1m}
    user_tokens_per_day: {limit: 1000}
    tenant_tokens_per_day: {limit: 5000, shadow: true}
    session_tool_calls: {limit: 2}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(clock: Clock) -> Limiter:
    return Limiter(MemoryStore(clock=clock), StaticTiers(parse_tiers(TIERS)), clock=clock)


def chat(user: str = "u", **kw: object) -> CheckInput:
    return CheckInput(tenant="t", user=user, tier="free", **{"requests": 1, **kw})  # type: ignore[arg-type]


async def test_the_window_slides_with_the_clock(limiter: Limiter, clock: Clock) -> None:
    for _ in range(4):
        assert (await limiter.check(chat())).decision == "allow"
    denied = await limiter.check(chat())
    assert denied.decision == "deny" and 60 <= denied.retry_after <= 63
    clock.now += denied.retry_after
    assert (await limiter.check(chat())).decision == "allow"


async def test_a_crashed_caller_leaks_no_budget(limiter: Limiter, clock: Clock) -> None:
    held = await limiter.check(chat(reserve_tokens=1000))
    assert held.decision == "allow" and held.reservation_id
    blocked = await limiter.check(chat(reserve_tokens=10))
    assert blocked.reason == "user_tokens_per_day" and 0 < blocked.retry_after <= 30
    clock.now += 31  # the caller never committed: its reservation expires
    assert (await limiter.check(chat(reserve_tokens=10))).decision == "allow"


async def test_counters_for_metrics(limiter: Limiter) -> None:
    for _ in range(5):
        await limiter.check(chat())
    for _ in range(6):
        await limiter.check(chat(user="v", reserve_tokens=1000, requests=0))
    stats = limiter.stats
    assert stats.decisions[("allow", "")] == 5 and stats.decisions[("deny", "requests")] == 1
    assert stats.over_limit["requests"] == 1 and stats.near_limit["requests"] >= 2
    assert stats.decisions[("deny", "user_tokens_per_day")] == 5
    # the tenant budget (5000) is in shadow: going past it is reported, never the denial reason
    assert stats.shadow_over["tenant_tokens_per_day"] == 0
    for user in ("w1", "w2", "w3", "w4", "w5"):
        last = await limiter.check(chat(user=user, reserve_tokens=1000, requests=0))
        assert last.decision == "allow"
    tenant = next(s for s in last.limits if s.name == "tenant_tokens_per_day")
    assert tenant.over and tenant.shadow and tenant.remaining == 0
    assert stats.shadow_over["tenant_tokens_per_day"] == 1


async def test_each_tenants_daily_budget_use_is_reported_until_the_day_resets(
    limiter: Limiter, clock: Clock
) -> None:
    # One user per Check: the user budget (1000) stays out of the way of the tenant's (5000).
    held = await limiter.check(chat(user="a", reserve_tokens=1000, requests=0))
    await limiter.check(CheckInput(tenant="other", user="a", tier="free", reserve_tokens=500))
    assert limiter.stats.budget_used(clock()) == {("t", "free"): 0.2, ("other", "free"): 0.1}
    # The Commit settles the reservation at what was spent: the share follows it.
    await limiter.commit("t", "a", "free", held.reservation_id, 250, 0)
    assert limiter.stats.budget_used(clock())[("t", "free")] == 0.05
    for user in ("b", "c", "d", "e", "f"):
        await limiter.check(chat(user=user, reserve_tokens=1000, requests=0))
    assert limiter.stats.budget_used(clock())[("t", "free")] == 1.0  # capped at all of it
    clock.now += 86_400  # a new day: yesterday's figures are not today's
    assert limiter.stats.budget_used(clock()) == {}


async def test_budget_use_names_a_bounded_number_of_tenants(clock: Clock) -> None:
    limiter = Limiter(MemoryStore(clock=clock), StaticTiers(parse_tiers(TIERS)), clock=clock, max_tenants=2)
    for tenant in ("t1", "t2", "t3", "t4"):
        await limiter.check(CheckInput(tenant=tenant, user="u", tier="free", reserve_tokens=100))
    assert set(limiter.stats.budget_used(clock())) == {("t1", "free"), ("t2", "free"), ("(other)", "free")}


async def test_a_tool_call_check_and_a_chat_check_with_one_id_are_different_requests(
    limiter: Limiter,
) -> None:
    first = await limiter.check(chat(session_id="s", request_id="r"))
    tool = await limiter.check(chat(session_id="s", request_id="r", requests=0, tool_calls=1))
    assert not tool.replayed and [s.name for s in tool.limits] == ["session_tool_calls"]
    assert (await limiter.check(chat(session_id="s", request_id="r"))).replayed
    assert not first.replayed


async def test_headroom_reports_expire_with_the_clock(limiter: Limiter, clock: Clock) -> None:
    await limiter.report_headroom(
        "p",
        "m",
        remaining_requests=0,
        remaining_tokens=-1,
        limit_requests=10,
        limit_tokens=-1,
        reset_requests=5,
        reset_tokens=0,
        rate_limited=False,
        retry_after=0,
    )
    assert (await limiter.check(chat(provider="p"))).decision == "deny"
    clock.now += 6  # the provider's window reset: the report no longer applies
    assert (await limiter.check(chat(provider="p"))).decision == "allow"


async def test_headroom_refills_towards_the_providers_reset_but_a_429_holds(
    limiter: Limiter, clock: Clock
) -> None:
    room = {"remaining_tokens": -1, "limit_tokens": -1, "reset_tokens": 0, "retry_after": 0}
    await limiter.report_headroom(
        "p", "m", remaining_requests=0, limit_requests=100, reset_requests=60, rate_limited=False, **room
    )
    assert (await limiter.check(chat(provider="p"))).decision == "deny"
    # Nobody has called p since: providers refill steadily, so halfway to its reset it is half full.
    clock.now += 30
    assert (await limiter.check(chat(provider="p"))).decision == "allow"
    await limiter.report_headroom(
        "q", "m", remaining_requests=5, limit_requests=100, reset_requests=60, rate_limited=True,
        **{**room, "retry_after": 20},
    )  # fmt: skip
    clock.now += 15  # within the 429's retry-after: still nothing left
    assert (await limiter.check(chat(provider="q"))).decision == "deny"


async def test_a_provider_whose_headroom_became_unknown_is_left_out(limiter: Limiter, clock: Clock) -> None:
    none: dict[str, Any] = {
        "remaining_tokens": -1,
        "limit_tokens": -1,
        "reset_tokens": 0,
        "rate_limited": False,
    }
    await limiter.report_headroom(
        "primary", "m", remaining_requests=0, limit_requests=100, reset_requests=60, retry_after=0, **none
    )
    assert (await limiter.check(chat())).decision == "deny"  # the only provider known is empty
    # Its breaker opened: no figures, only how long this holds. The fallback has not been called
    # yet, so nothing is known to be short: the router may use it, and nobody is throttled.
    await limiter.report_headroom(
        "primary", "m", remaining_requests=-1, limit_requests=-1, reset_requests=0, retry_after=30, **none
    )
    assert (await limiter.check(chat())).decision == "allow"
    await limiter.report_headroom(
        "fallback", "m", remaining_requests=5, limit_requests=100, reset_requests=60, retry_after=0, **none
    )
    assert (await limiter.check(chat())).decision == "deny"  # now the fallback is known to be short
    # A report with neither figures nor a horizon says nothing and changes nothing.
    await limiter.report_headroom(
        "fallback", "m", remaining_requests=-1, limit_requests=-1, reset_requests=0, retry_after=0, **none
    )
    assert (await limiter.check(chat())).decision == "deny"


def test_headroom_reports_travel_between_replicas_whole() -> None:
    report = HeadroomReport("p", "m", 0.25, 160.0, False, 100.0, 200.0)
    assert HeadroomReport.decode(report.encode()) == report
    assert report.fraction_at(150.0) == 0.625
    older = '{"p": "p", "m": "m", "f": 0.25, "u": 160.0, "r": false, "a": 100.0}'  # before full_at
    assert HeadroomReport.decode(older) == HeadroomReport("p", "m", 0.25, 160.0, False, 100.0)


def test_delay_grows_with_the_shortage_and_priorities_are_ordered() -> None:
    policy = Throttle()
    board = HeadroomBoard()
    board.update(HeadroomReport("p", "m", 0.45, 100.0, at=1))
    shallow = judge(policy, "low", board.headroom("p", 0.0))
    board.update(HeadroomReport("p", "m", 0.25, 100.0, at=2))
    deep = judge(policy, "low", board.headroom("p", 0.0))
    assert shallow.action == deep.action == "delay" and 0 < shallow.seconds < deep.seconds <= policy.max_delay
    assert [judge(policy, p, board.headroom("p", 0.0)).action for p in ("normal", "high", "critical")] == [
        "delay",
        "allow",
        "allow",
    ]
    # an older report arriving late does not override a newer one
    board.update(HeadroomReport("p", "m", 0.9, 100.0, at=1))
    assert board.headroom("p", 0.0) == (0.25, 100.0)
    # with no provider named, the best provider's headroom counts
    board.update(HeadroomReport("q", "m", 0.8, 100.0, at=3))
    assert board.headroom("", 0.0) == (0.8, 100.0)


def test_the_shipped_tiers_file_is_valid() -> None:
    config = load_tiers(ROOT / "config" / "limiter_tiers.yaml")
    assert config.tiers["free"].requests.limit == 20 and config.tiers["free"].requests.window == 3600
    assert config.tiers["enterprise"].requests.unlimited and config.tiers["enterprise"].priority == "high"
    assert config.tiers["paid"].tool_calls.limit == 25


def test_a_bad_tiers_file_names_every_problem_at_its_line() -> None:
    bad = """\
default_tier: gold
reservation_ttl: 2d
tiers:
  free:
    priority: urgent
    requests: { limit: -3, window: soon }
    user_tokens_per_day: { shadow: maybe }
    tenant_tokens_per_day: {}
    colour: red
throttle: { priorities: { low: { delay_below: 0.1, deny_below: 0.4 }, urgent: {} } }
"""
    with pytest.raises(TiersError) as info:
        parse_tiers(bad, "t.yaml")
    assert sorted(info.value.problems) == sorted(
        [
            "t.yaml:1: default_tier: 'gold' is not a tier",
            "t.yaml:2: reservation_ttl: must be at most 86400s, got 172800s",
            "t.yaml:5: tiers.free.priority: 'urgent' is not one of low, normal, high, critical",
            "t.yaml:6: tiers.free.requests.limit: -3 must be at least 0",
            "t.yaml:6: tiers.free.requests.window: expected a positive duration such as 250ms, 5s, 2m, 1h or 1d",
            "t.yaml:7: tiers.free.user_tokens_per_day: needs `limit` (or `unlimited: true`)",
            "t.yaml:7: tiers.free.user_tokens_per_day.shadow: expected true or false, got 'maybe'",
            "t.yaml:8: tiers.free.tenant_tokens_per_day: needs `limit` (or `unlimited: true`)",
            "t.yaml:9: tiers.free: unknown key 'colour' (allowed: priority, requests, "
            "session_tool_calls, tenant_tokens_per_day, user_tokens_per_day)",
            "t.yaml:10: throttle.priorities: unknown key 'urgent' (allowed: critical, high, low, normal)",
            "t.yaml:10: throttle.priorities.low: deny_below must not exceed delay_below "
            "(requests are delayed before denied)",
        ]
    )


def test_a_tiers_file_without_tiers_or_not_yaml_is_refused_with_its_line() -> None:
    with pytest.raises(TiersError) as info:
        parse_tiers("session_ttl: 1h\n", "t.yaml")
    assert info.value.problems == ["t.yaml:1: tiers: expected a non-empty mapping of tier name to limits"]
    with pytest.raises(TiersError) as info:
        parse_tiers("tiers:\n  free: [1, 2]\n", "t.yaml")
    assert info.value.problems == ["t.yaml:2: tiers.free must be a mapping"]
    with pytest.raises(TiersError, match=r"t.yaml:2: not valid YAML"):
        parse_tiers("tiers: {\nfree: ]\n", "t.yaml")


def test_left_empty_entries_take_their_defaults() -> None:
    config = parse_tiers("tiers:\n  free:\n    requests:\n    priority:\nthrottle:\n")
    free = config.tiers["free"]
    assert free.priority == "normal" and free.requests.unlimited and free.requests.window == 3600.0
    assert config.reservation_ttl == 600.0 and config.throttle == Throttle()


def test_bad_files_stop_start_up_naming_the_variable(tmp_path: Path) -> None:
    from services.kit.config import ConfigError, Env
    from services.limiter.config import LimiterSettings

    bad = tmp_path / "tiers.yaml"
    bad.write_text("tiers: {free: {requests: {limit: -1}}}")
    env = Env(
        {
            "BALLAST_LIMITER_TIERS_FILE": str(bad),
            "BALLAST_LIMITER_ENVOY_CONFIG": str(tmp_path / "missing.yaml"),
            "BALLAST_LIMITER_FAIL_MODE": "sometimes",
        }
    )
    LimiterSettings.from_env(env)
    with pytest.raises(ConfigError) as info:
        env.check()
    text = str(info.value)
    assert "BALLAST_LIMITER_TIERS_FILE" in text and "tiers.free.requests.limit" in text
    assert "BALLAST_LIMITER_ENVOY_CONFIG" in text and "BALLAST_LIMITER_FAIL_MODE" in text


def test_reservation_ids_are_unique_and_ids_in_keys_are_escaped_only_when_needed() -> None:
    ids = {new_reservation_id() for _ in range(10_000)}
    assert len(ids) == 10_000 and all(len(i) == 32 for i in ids)
    assert _q("user-1.a_b~") == "user-1.a_b~"
    # Anything that could forge a key or break the {hash tag} is escaped.
    assert _q("a:b}{c d") == "a%3Ab%7D%7Bc%20d" and _q("é") == "%C3%A9"
