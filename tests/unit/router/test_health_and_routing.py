"""Breaker timing with a fake clock, the `auto` rule, strategies, regions and filters."""

from __future__ import annotations

import random

import pytest

from services.kit.errors import FailedPrecondition, InvalidArgument
from services.router.catalog import Strategy, parse_catalog
from services.router.config import BreakerSettings
from services.router.health import BreakerState, HealthBook
from services.router.model import ChatRequest, Message, Params, Role, Tool, Usage
from services.router.pricing import cost_of, estimate
from services.router.providers.base import Headroom, Outcome
from services.router.routing import Choice, Hints, Planner, is_complex


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


T = ("p", "m")


def book(clock: FakeClock, **kw: float) -> HealthBook:
    return HealthBook(BreakerSettings(failure_threshold=3, open_for=10.0, half_open_probes=1, **kw), clock)


def test_breaker_opens_after_consecutive_failures_and_half_opens_to_probe() -> None:
    clock = FakeClock()
    health = book(clock)
    for _ in range(2):
        assert health.acquire(T)
        health.failure(T, Outcome.SERVER_ERROR, 0.1)
    assert health.state(T) is BreakerState.CLOSED
    health.success(T, 0.1)  # a success resets the count
    for _ in range(3):
        assert health.acquire(T)
        health.failure(T, Outcome.TIMEOUT, 1.0)
    assert health.state(T) is BreakerState.OPEN
    assert not health.acquire(T)
    clock.now += 9.9
    assert not health.acquire(T)
    clock.now += 0.2
    assert health.state(T) is BreakerState.HALF_OPEN
    assert health.acquire(T)  # the one probe
    assert not health.acquire(T)  # no second probe while the first is out
    health.failure(T, Outcome.CONNECTION_ERROR, 0.0)
    assert health.state(T) is BreakerState.OPEN  # a failed probe re-opens at once
    clock.now += 10.0
    assert health.acquire(T)
    health.success(T, 0.05)
    assert health.state(T) is BreakerState.CLOSED
    assert health.acquire(T) and health.acquire(T)


def test_rate_limits_and_caller_errors_do_not_trip_the_breaker() -> None:
    clock = FakeClock()
    health = book(clock)
    for _ in range(5):
        health.failure(T, Outcome.RATE_LIMITED, 0.1, retry_after=2.0)
        health.failure(T, Outcome.CLIENT_ERROR, 0.1)
    assert health.state(T) is BreakerState.CLOSED
    assert health.cooling_down(T)
    clock.now += 2.1
    assert not health.cooling_down(T)


def test_ewma_latency_and_error_rate() -> None:
    health = book(FakeClock(), ewma_alpha=0.5)
    health.success(T, 1.0)
    health.success(T, 3.0)
    assert health.get(T).ewma_latency == pytest.approx(2.0)
    health.failure(T, Outcome.SERVER_ERROR, 1.0)
    assert health.get(T).error_rate == pytest.approx(0.5)
    assert (health.get(T).requests, health.get(T).failures) == (3, 1)


CATALOG = """
providers:
  us: {kind: openai_compatible, base_url: "http://127.0.0.1:1/v1", region: us}
  eu: {kind: openai_compatible, base_url: "http://127.0.0.1:2/v1", region: eu}
  sim: {kind: sim, region: us}
  keyed: {kind: openai, base_url: "https://api.example/v1", api_key_env: KEY}
models:
  cheap-us: {provider: us, input_price_micros_per_mtok: 100, output_price_micros_per_mtok: 200}
  dear-us: {provider: us, input_price_micros_per_mtok: 5000, output_price_micros_per_mtok: 9000, context_window: 100}
  mid-eu: {provider: eu, input_price_micros_per_mtok: 1000, output_price_micros_per_mtok: 2000}
  sim-model: {provider: sim}
  real: {provider: keyed}
aliases:
  budget: {strategy: lowest_cost, candidates: [dear-us, mid-eu, cheap-us]}
  reasoning: {strategy: ordered, candidates: [dear-us, mid-eu, cheap-us]}
  weighted: {strategy: weighted, candidates: [{model: cheap-us, weight: 9}, {model: mid-eu, weight: 1}]}
  mixed: {candidates: [sim-model, real]}
  offonly: {candidates: [real]}
auto:
  simple: budget
  complex: reasoning
  long_input_tokens: 50
  max_simple_messages: 3
  complex_keywords: [step by step]
tier_defaults: {default: budget, enterprise: reasoning}
"""


def planner(keys: dict[str, str] | None = None) -> tuple[Planner, HealthBook, FakeClock]:
    clock = FakeClock()
    health = book(clock)
    catalog = parse_catalog(CATALOG, "c.yaml", (keys or {}).get)
    return Planner(catalog, health, rng=random.Random(1), wall_clock=clock), health, clock


def chat(*texts: str, tools: tuple[Tool, ...] = ()) -> ChatRequest:
    return ChatRequest(tuple(Message(Role.USER, t) for t in texts), tools)


def order(plan_choices: list[Choice]) -> list[str]:
    return [c.model.id for c in plan_choices]


def test_auto_rule() -> None:
    p, _, _ = planner()
    rule = p.catalog.auto
    assert not is_complex(chat("what time is it?"), rule)
    assert is_complex(chat("Explain it STEP BY STEP"), rule)
    assert is_complex(chat("x" * 400), rule)  # about 100 tokens > 50
    assert is_complex(chat("a", "b", "c", "d"), rule)
    assert is_complex(chat("hi", tools=(Tool("t"),)), rule)
    assert p.plan("auto", request=chat("hi")).resolved == "budget"
    assert p.plan("auto", request=chat("prove it step by step")).resolved == "reasoning"


def test_tier_defaults_and_unknown_models() -> None:
    p, _, _ = planner()
    assert p.plan("", request=chat("hi")).resolved == "budget"
    assert p.plan("", tier="enterprise", request=chat("hi")).resolved == "reasoning"
    assert p.plan("", tier="nobody", request=chat("hi")).resolved == "budget"
    with pytest.raises(InvalidArgument) as info:
        p.plan("gpt-9", request=chat("hi"))
    assert info.value.field == "model" and "budget" in info.value.description
    with pytest.raises(FailedPrecondition, match="KEY"):
        p.plan("real", request=chat("hi"))
    with pytest.raises(FailedPrecondition):
        p.plan("offonly", request=chat("hi"))


def test_strategies() -> None:
    p, health, _ = planner()
    assert order(p.plan("reasoning", request=chat("hi")).choices) == ["dear-us", "mid-eu", "cheap-us"]
    assert order(p.plan("budget", request=chat("hi")).choices) == ["cheap-us", "mid-eu", "dear-us"]
    health.success(("us", "cheap-us"), 0.5)
    health.success(("eu", "mid-eu"), 0.1)
    health.success(("us", "dear-us"), 0.3)
    latency = Hints(strategy=Strategy.LOWEST_LATENCY)
    assert order(p.plan("reasoning", hints=latency, request=chat("hi")).choices) == [
        "mid-eu",
        "dear-us",
        "cheap-us",
    ]
    firsts = [p.plan("weighted", request=chat("hi")).choices[0].model.id for _ in range(400)]
    assert 0.8 < firsts.count("cheap-us") / 400 < 0.97


def test_health_moves_candidates_back() -> None:
    p, health, clock = planner()
    for _ in range(3):
        health.failure(("us", "dear-us"), Outcome.SERVER_ERROR, 0.1)
    health.failure(("eu", "mid-eu"), Outcome.RATE_LIMITED, 0.1, retry_after=5)
    assert order(p.plan("reasoning", request=chat("hi")).choices) == ["cheap-us", "mid-eu", "dear-us"]
    clock.now += 6  # mid-eu's retry-after has passed
    health.observe_headroom(
        ("us", "cheap-us"), Headroom(remaining_requests=0, reset_requests=30, observed_at=clock.now)
    )
    assert order(p.plan("reasoning", request=chat("hi")).choices)[0] == "mid-eu"


def test_an_error_streak_fades_so_a_demoted_target_is_tried_again() -> None:
    p, health, clock = planner()
    for _ in range(6):  # an outage: dear-us fails, its error rate passes the threshold
        health.failure(("us", "dear-us"), Outcome.SERVER_ERROR, 0.1)
        health.success(("us", "dear-us"), 0.1)  # (successes in between keep the breaker shut)
        health.failure(("us", "dear-us"), Outcome.SERVER_ERROR, 0.1)
    assert health.error_rate(("us", "dear-us")) > 0.5
    assert order(p.plan("reasoning", request=chat("hi")).choices)[0] == "mid-eu"
    # Nobody calls dear-us now, so no success can lower its error rate; time does.
    clock.now += 10
    assert 0.25 < health.error_rate(("us", "dear-us")) < 0.5
    assert order(p.plan("reasoning", request=chat("hi")).choices)[0] == "dear-us"
    health.failure(("us", "dear-us"), Outcome.SERVER_ERROR, 0.1)  # still failing: a new streak counts
    health.failure(("us", "dear-us"), Outcome.SERVER_ERROR, 0.1)
    assert order(p.plan("reasoning", request=chat("hi")).choices)[0] == "mid-eu"


def test_a_providers_last_headroom_is_kept_for_high_priority() -> None:
    clock = FakeClock()
    health = book(clock)
    catalog = parse_catalog(CATALOG, "c.yaml", lambda name: None)
    p = Planner(catalog, health, rng=random.Random(1), wall_clock=clock, headroom_reserve=0.2)

    def report(remaining: int) -> None:
        health.observe_headroom(
            ("us", "dear-us"),
            Headroom(
                remaining_requests=remaining, limit_requests=100, reset_requests=30, observed_at=clock.now
            ),
        )

    report(50)  # plenty left: everyone's first choice stays first
    assert order(p.plan("reasoning", request=chat("hi")).choices)[0] == "dear-us"
    report(20)  # the last fifth: kept for high priority, the others go elsewhere first
    assert order(p.plan("reasoning", request=chat("hi")).choices) == ["mid-eu", "cheap-us", "dear-us"]
    assert order(p.plan("reasoning", request=chat("hi"), high_priority=True).choices)[0] == "dear-us"
    clock.now += 31  # the window the report described has reset
    assert order(p.plan("reasoning", request=chat("hi")).choices)[0] == "dear-us"
    report(0)  # exhausted: nobody's first choice, high priority included
    assert order(p.plan("reasoning", request=chat("hi"), high_priority=True).choices)[0] == "mid-eu"
    unreserved = Planner(catalog, health, wall_clock=clock)  # reserve 0: only exhaustion counts
    report(1)
    assert order(unreserved.plan("reasoning", request=chat("hi")).choices)[0] == "dear-us"


def test_region_preference_and_requirement() -> None:
    p, _, _ = planner()
    assert order(p.plan("reasoning", caller_region="eu", request=chat("hi")).choices)[0] == "mid-eu"
    assert order(
        p.plan("reasoning", hints=Hints(region="eu", region_required=True), request=chat("hi")).choices
    ) == ["mid-eu"]
    with pytest.raises(FailedPrecondition):
        p.plan("reasoning", hints=Hints(region="ap", region_required=True), request=chat("hi"))


def test_filters_exclude_cost_cap_and_context_window() -> None:
    p, _, _ = planner()
    excluded = p.plan("reasoning", hints=Hints(exclude_providers=frozenset({"us"})), request=chat("hi"))
    assert order(excluded.choices) == ["mid-eu"]
    capped = p.plan(
        "reasoning",
        hints=Hints(max_cost_micros=1),
        request=ChatRequest((Message(Role.USER, "hi"),), params=Params(max_output_tokens=1000)),
    )
    assert order(capped.choices) == ["cheap-us"]
    long = chat("y" * 2000)  # about 500 tokens: more than dear-us's window of 100
    assert "dear-us" not in order(p.plan("reasoning", request=long).choices)


def test_simulated_models_step_aside_when_a_real_one_is_enabled() -> None:
    p, _, _ = planner()
    assert [c.model for c in p.effective_candidates("mixed")] == ["sim-model"]
    p, _, _ = planner({"KEY": "sk-1"})
    assert [c.model for c in p.effective_candidates("mixed")] == ["real"]


def test_cost_in_micro_dollars() -> None:
    p, _, _ = planner()
    model = p.catalog.models["mid-eu"]  # 1000 / 2000 micro-dollars per million tokens
    cost = cost_of(model, Usage(input_tokens=1_000_000, output_tokens=500_000))
    assert (cost.input_micros, cost.output_micros, cost.total_micros) == (1000, 1000, 2000)
    assert estimate(model, 2_000_000, 0) == 2000
    # cached tokens at the cached price (defaults to the input price)
    from dataclasses import replace

    cached = replace(model, cached_input_price_micros_per_mtok=100)
    assert cost_of(cached, Usage(input_tokens=1_000_000, cached_input_tokens=1_000_000)).input_micros == 100
