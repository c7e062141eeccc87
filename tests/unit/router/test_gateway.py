"""The gateway's retry, backoff and timeout rules with an injected clock and sleep (no waiting).

The provider here is a scripted in-process double of an adapter; the wire formats are covered
by test_adapters.py and the whole path by test_faults.py.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from services.kit.config import ServerSettings
from services.kit.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from services.router.catalog import Model, Provider, parse_catalog
from services.router.config import BreakerSettings, RetrySettings, RouterSettings, TimeoutSettings
from services.router.health import HealthBook
from services.router.model import ChatRequest, ChatResult, Delta, EmbedResult, Finish, Message, Role, Usage
from services.router.providers.base import Outcome, ProviderError
from services.router.router import Call, Gateway
from services.router.routing import Hints, Planner

CATALOG = """
providers:
  a: {kind: openai_compatible, base_url: "http://127.0.0.1:1/v1"}
  b: {kind: openai_compatible, base_url: "http://127.0.0.1:2/v1"}
models:
  ma: {provider: a}
  mb: {provider: b}
aliases:
  budget: {candidates: [ma, mb]}
  reasoning: {candidates: [ma]}
tier_defaults: {default: budget}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@dataclass
class Scripted:
    """Answers each call with the next scripted item: a ProviderError to raise or 'ok'."""

    provider: Provider
    script: list[object] = field(default_factory=list)
    calls: int = 0

    async def complete(self, model: Model, request: ChatRequest) -> ChatResult:
        self.calls += 1
        item = self.script.pop(0) if self.script else "ok"
        if isinstance(item, ProviderError):
            raise item
        if item == "hang":
            await asyncio.sleep(3600)
        return ChatResult(Message(Role.ASSISTANT, "ok"), Finish.STOP, Usage(10, 5), model.provider_model)

    def stream(self, model: Model, request: ChatRequest) -> AsyncIterator[Delta | ChatResult]:
        raise NotImplementedError

    async def embed(self, model: Model, inputs: list[str]) -> EmbedResult:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


def make(retry: RetrySettings | None = None) -> tuple[Gateway, Clock, Scripted, Scripted]:
    clock = Clock()
    catalog = parse_catalog(CATALOG)
    settings = RouterSettings(ServerSettings("router"), catalog, retry=retry or RetrySettings(max_attempts=4))
    health = HealthBook(BreakerSettings(failure_threshold=100), clock)
    a, b = Scripted(catalog.providers["a"]), Scripted(catalog.providers["b"])
    gateway = Gateway(
        settings,
        Planner(catalog, health),
        health,
        {"a": a, "b": b},
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(0),
    )
    return gateway, clock, a, b


REQUEST = ChatRequest((Message(Role.USER, "hi"),))


def err(
    outcome: Outcome, status: int = 0, retry_after: float | None = None, caller: bool = False
) -> ProviderError:
    return ProviderError(
        outcome, f"HTTP {status}", http_status=status, retry_after=retry_after, caller_fault=caller
    )


async def test_failover_then_a_second_round_after_jittered_backoff() -> None:
    gateway, clock, a, b = make()
    a.script = [err(Outcome.SERVER_ERROR, 500), "ok"]
    b.script = [err(Outcome.SERVER_ERROR, 503)]
    answer = await gateway.complete(Call(deadline=100.0), REQUEST)
    assert [(x.provider, x.outcome) for x in answer.attempts] == [
        ("a", Outcome.SERVER_ERROR),
        ("b", Outcome.SERVER_ERROR),
        ("a", Outcome.OK),
    ]
    (wait,) = clock.slept
    assert 0.05 <= wait <= 0.1  # base 50 ms doubled once, full jitter in its upper half


async def test_retry_after_sets_the_backoff_floor() -> None:
    gateway, clock, a, b = make()
    a.script = [err(Outcome.RATE_LIMITED, 429, retry_after=2.5)]
    b.script = [err(Outcome.RATE_LIMITED, 429, retry_after=1.0)]
    answer = await gateway.complete(Call(deadline=100.0), REQUEST)
    assert clock.slept == [2.5]
    assert answer.attempts[-1].outcome is Outcome.OK


async def test_too_long_a_retry_after_is_not_waited_for() -> None:
    gateway, clock, a, b = make(RetrySettings(max_attempts=4, max_retry_after=1.0))
    a.script = [err(Outcome.RATE_LIMITED, 429, retry_after=30)]
    b.script = [err(Outcome.RATE_LIMITED, 429, retry_after=20)]
    with pytest.raises(ResourceExhausted) as info:
        await gateway.complete(Call(deadline=100.0), REQUEST)
    assert clock.slept == [] and info.value.retry_after == 20


async def test_backoff_never_runs_past_the_deadline() -> None:
    gateway, clock, a, b = make()
    a.script = [err(Outcome.RATE_LIMITED, 429, retry_after=3)]
    b.script = [err(Outcome.SERVER_ERROR, 500)]
    with pytest.raises(Unavailable):
        await gateway.complete(Call(deadline=2.0), REQUEST)
    assert clock.slept == []


async def test_max_attempts_caps_everything() -> None:
    gateway, _, a, b = make()
    a.script = [err(Outcome.CONNECTION_ERROR)] * 5
    b.script = [err(Outcome.CONNECTION_ERROR)] * 5
    with pytest.raises(Unavailable) as info:
        await gateway.complete(Call(deadline=100.0, hints=Hints(max_attempts=3)), REQUEST)
    assert a.calls + b.calls == 3
    assert "a/ma: connection_error" in info.value.message


async def test_caller_errors_stop_at_once() -> None:
    gateway, clock, a, b = make()
    a.script = [err(Outcome.CLIENT_ERROR, 400, caller=True)]
    with pytest.raises(InvalidArgument):
        await gateway.complete(Call(deadline=100.0), REQUEST)
    assert (a.calls, b.calls, clock.slept) == (1, 0, [])


async def test_attempt_timeouts_come_from_the_deadline() -> None:
    gateway, _, a, b = make()
    assert gateway._timeout_for(Call(deadline=10.0), more_to_come=True) == 5.0
    assert gateway._timeout_for(Call(deadline=10.0), more_to_come=False) == 10.0
    assert gateway._timeout_for(Call(deadline=1000.0), more_to_come=False) == 60.0  # the attempt cap
    with pytest.raises(DeadlineExceeded):
        await gateway.complete(Call(deadline=0.0), REQUEST)
    assert a.calls == b.calls == 0


async def test_stall_detection_caps_attempts_on_targets_with_a_known_latency() -> None:
    gateway, _, _, _ = make()
    target = ("a", "ma")
    assert gateway._timeout_for(Call(deadline=100.0), True, target) == 50.0  # nothing measured yet
    for _ in range(5):
        answer = await gateway.complete(Call(deadline=100.0), REQUEST)
        assert answer.attempts[-1].provider == "a"
    # instant answers so far: the floor (2 s) applies while a fallback exists ...
    assert gateway._timeout_for(Call(deadline=100.0), True, target) == 2.0
    # ... but never to the last candidate, and not to another kind of latency
    assert gateway._timeout_for(Call(deadline=100.0), False, target) == 60.0
    assert gateway._timeout_for(Call(deadline=100.0), True, target, "first_token") == 50.0


@dataclass
class Streaming(Scripted):
    """Streams `pieces` deltas; after `stall_after` of them it stops sending (never ends)."""

    pieces: int = 5
    stall_after: int | None = None

    async def _events(self, model: Model) -> AsyncIterator[Delta | ChatResult]:
        for index in range(self.pieces):
            if index == self.stall_after:
                await asyncio.Event().wait()
            yield Delta(f"t{index} ")
        text = "".join(f"t{i} " for i in range(self.pieces))
        yield ChatResult(
            Message(Role.ASSISTANT, text), Finish.STOP, Usage(3, self.pieces), model.provider_model
        )

    def stream(self, model: Model, request: ChatRequest) -> AsyncIterator[Delta | ChatResult]:
        return self._events(model)


def make_streaming(stream_idle: float, stall_after: int | None) -> tuple[Gateway, Streaming]:
    catalog = parse_catalog(CATALOG)
    settings = RouterSettings(
        ServerSettings("router"), catalog, timeouts=TimeoutSettings(stream_idle=stream_idle)
    )
    health = HealthBook(BreakerSettings(failure_threshold=100), time.monotonic)
    a = Streaming(catalog.providers["a"], stall_after=stall_after)
    b = Streaming(catalog.providers["b"])
    gateway = Gateway(settings, Planner(catalog, health), health, {"a": a, "b": b}, clock=time.monotonic)
    return gateway, a


async def test_a_stream_that_stops_sending_ends_unavailable_after_the_idle_limit() -> None:
    gateway, _ = make_streaming(stream_idle=0.05, stall_after=2)
    got: list[object] = []
    with pytest.raises(Unavailable, match="broke after it had started: the stream stalled"):
        async for event in gateway.stream(Call(model="reasoning", deadline=time.monotonic() + 60), REQUEST):
            got.append(event)
    assert [e.text for e in got if isinstance(e, Delta)] == ["t0 ", "t1 "]


async def test_a_caller_slower_than_the_idle_limit_does_not_stall_its_stream() -> None:
    """Only waiting for the provider counts against stream_idle, not the caller's own time
    between items (the provider's items are ready at once here)."""
    gateway, _ = make_streaming(stream_idle=0.02, stall_after=None)
    texts = []
    async for event in gateway.stream(Call(model="reasoning", deadline=time.monotonic() + 60), REQUEST):
        await asyncio.sleep(0.06)  # three idle limits per item
        if isinstance(event, Delta):
            texts.append(event.text)
    assert texts == [f"t{i} " for i in range(5)]


async def test_a_stream_cancelled_from_outside_is_cancelled_not_stalled() -> None:
    gateway, _ = make_streaming(stream_idle=30.0, stall_after=1)
    reached = asyncio.Event()

    async def read() -> None:
        async for _ in gateway.stream(Call(model="reasoning", deadline=time.monotonic() + 60), REQUEST):
            reached.set()

    task = asyncio.create_task(read())
    await reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
